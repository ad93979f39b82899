"""Chat template: a list of messages -> the prompt a chat model continues; and <think> sections for display.

nanoseek's template uses the special tokens of nanoseek/tokenizer.py, each a single id:

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{answer}<|end|><|user|>...<|assistant|>

The prompt ends with `<|assistant|>`; the model's turn ends with `<|end|>`, which is a stop token (so is
`<|user|>`, in case a weak model starts writing the user's next turn). A checkpoint with a released DeepSeek
tokenizer gets DeepSeek-V3's own layout instead: `<｜begin▁of▁sentence｜>{system}<｜User｜>{u}<｜Assistant｜>{a}
<｜end▁of▁sentence｜>...<｜Assistant｜>`.

Reasoning models answer `<think>...</think>` then the answer (R1). Following DeepSeek-R1's template, earlier
assistant turns are re-inserted without their <think> part: the context keeps answers, not old thoughts.
`ThinkSplitter` separates the thinking from the answer in a token stream, for a terminal or the chat page.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from nanoseek.tokenizer import ASSISTANT, BOS, END, END_THINK, SYSTEM, THINK, USER

_THINK_BLOCK = re.compile(re.escape(THINK) + r".*?" + re.escape(END_THINK) + r"\s*", re.DOTALL)


class ChatTemplateError(ValueError):
    """Messages that cannot be rendered (bad role or content), or a tokenizer without chat tokens."""


@dataclass(frozen=True)
class Template:
    bos: str
    system: str  # prefix of a system message
    user: str
    assistant: str
    end: str  # closes a turn ("" where the next role token closes it)
    assistant_end: str  # closes an assistant turn

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        parts = [self.bos]
        for i, m in enumerate(messages):
            role, content = _role(m, i), _content(m, i)
            if role == "system":
                parts.append(self.system + content + self.end)
            elif role == "user":
                parts.append(self.user + content + self.end)
            else:
                parts.append(self.assistant + _THINK_BLOCK.sub("", content) + self.assistant_end)
        if add_generation_prompt:
            parts.append(self.assistant)
        return "".join(parts)

    def stop_tokens(self) -> list[str]:
        """Token strings that end the model's turn."""
        return [t for t in {self.assistant_end, self.user} if t]


NANOSEEK = Template(bos=BOS, system=SYSTEM, user=USER, assistant=ASSISTANT, end=END, assistant_end=END)
DEEPSEEK = Template(
    bos="<｜begin▁of▁sentence｜>",
    system="",
    user="<｜User｜>",
    assistant="<｜Assistant｜>",
    end="",
    assistant_end="<｜end▁of▁sentence｜>",
)


def template_for(tokenizer) -> Template:
    """The template whose special tokens this tokenizer has."""
    for t in (NANOSEEK, DEEPSEEK):
        if all(tokenizer.token_id(s) is not None for s in (t.user, t.assistant, t.assistant_end)):
            return t
    raise ChatTemplateError(
        f"the tokenizer has neither nanoseek's chat tokens ({USER}, {ASSISTANT}, {END}) nor DeepSeek's"
    )


def encode_chat(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(prompt token ids, stop token ids) for a conversation that the assistant continues."""
    if not messages:
        raise ChatTemplateError("messages: must be a non-empty list")
    template = template_for(tokenizer)
    ids = tokenizer.encode(template.render(messages))  # special-token strings encode to their single ids
    return ids, [tokenizer.token_id(s) for s in template.stop_tokens()]


def _role(m, i: int) -> str:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise ChatTemplateError(f"messages[{i}].role: must be 'system', 'user' or 'assistant'")
    return m["role"]


def _content(m: dict, i: int) -> str:
    """A string, or OpenAI's list of content parts of which only text parts are supported."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        if all(isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
    raise ChatTemplateError(f"messages[{i}].content: must be a string or a list of text parts")


class ThinkSplitter:
    """Feed streamed text; get (kind, text) pieces, kind "think" inside <think>...</think>, else "answer".

    A tag split across two chunks is held back until it is complete, so a piece never holds half a tag.
    The tags themselves are dropped.
    """

    def __init__(self):
        self.thinking = False
        self._pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        buf, out = self._pending + text, []
        while buf:
            tag = END_THINK if self.thinking else THINK
            i = buf.find(tag)
            if i >= 0:
                out.append((self._kind(), buf[:i]))
                buf, self.thinking = buf[i + len(tag) :], not self.thinking
                continue
            keep = _partial_suffix(buf, tag)
            out.append((self._kind(), buf[: len(buf) - keep]))
            buf = buf[len(buf) - keep :]
            break
        self._pending = buf
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[str, str]]:
        out, self._pending = self._pending, ""
        return [(self._kind(), out)] if out else []

    def _kind(self) -> str:
        return "think" if self.thinking else "answer"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_think(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a complete reply."""
    splitter = ThinkSplitter()
    pieces = splitter.feed(text) + splitter.flush()
    think = "".join(t for k, t in pieces if k == "think")
    answer = "".join(t for k, t in pieces if k == "answer")
    return think, answer
