"""Prompt templates for RL (R1-Zero and R1 modes) and the SFT encoding with its assistant-only loss mask.

Two ways to ask a question (DeepSeek-R1 v1):
- R1-Zero mode (§2.2.1): RL straight from a base model. The prompt is the plain-text template of Table 1,
  verbatim below, and the model continues after "Assistant:". Generation stops at `</answer>`, which stays part
  of the completion (the format reward needs it, and the policy must learn to emit it).
- R1 mode (§2.3): after a cold-start SFT. The prompt is the chat template of nanoseek/infer/chat.py (the one the
  inference engine and server use), ending in `<|assistant|>`; the turn ends with `<|end|>`, which is trained
  (it is in the completion's token ids) but is not part of the text the rewards see.

SFT (`encode_conversation`): the conversation is rendered message by message with the same chat template and
every token gets a label: -100 (no loss) for the BOS, system and user turns and the `<|assistant|>` marker; the
token itself for the assistant's content and the `<|end|>` that closes it, so the model learns to stop. The
pieces are split at special tokens only, so encoding them separately gives the same ids as encoding the whole
string. Earlier assistant turns lose their `<think>` block as at inference (R1's multi-turn rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanoseek.infer.chat import ChatTemplateError, template_for
from nanoseek.tokenizer import END_ANSWER, Tokenizer

IGNORE = -100

# DeepSeek-R1 v1, Table 1 (arXiv 2501.12948), verbatim; "prompt" is replaced by the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: prompt. "
    "Assistant:"
)
MODES = ("r1", "r1-zero")


@dataclass(frozen=True)
class PromptFormat:
    """How questions become prompt ids, and which token ends a completion."""

    mode: str
    tokenizer: Tokenizer
    stop_id: int  # ends a completion; kept in its token ids
    stop_in_text: bool  # is the stop token part of the text given to rewards?

    def prompt_ids(self, question: str) -> list[int]:
        tok = self.tokenizer
        if self.mode == "r1-zero":
            text = R1_ZERO_TEMPLATE.replace("User: prompt.", f"User: {question}.")
            return tok.encode(text, bos=tok.bos_id is not None)
        return tok.encode(template_for(tok).render([{"role": "user", "content": question}]))

    def completion_text(self, ids: Sequence[int]) -> str:
        """The text rewards see: the decoded completion, without an end-of-turn stop token."""
        if ids and ids[-1] == self.stop_id and not self.stop_in_text:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)


def prompt_format(tokenizer: Tokenizer, mode: str = "r1") -> PromptFormat:
    if mode not in MODES:
        raise ChatTemplateError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "r1-zero":
        stop = tokenizer.token_id(END_ANSWER)
        if stop is None:
            raise ChatTemplateError(f"r1-zero mode needs a tokenizer with a {END_ANSWER} token")
        return PromptFormat(mode, tokenizer, stop, stop_in_text=True)
    end = template_for(tokenizer).assistant_end
    return PromptFormat(mode, tokenizer, tokenizer.token_id(end), stop_in_text=False)


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole conversation; labels are IGNORE outside the assistant's turns."""
    if not messages or not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
        raise ChatTemplateError("a training conversation needs at least one assistant message")
    t = template_for(tokenizer)
    ids: list[int] = tokenizer.encode(t.bos)
    labels = [IGNORE] * len(ids)
    last_assistant = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")

    def add(text: str, train: bool) -> None:
        piece = tokenizer.encode(text)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE] * len(piece))

    for i, m in enumerate(messages):
        rendered = t.render([m], add_generation_prompt=False)[len(t.bos) :]  # validates role and content
        if m["role"] != "assistant":
            add(rendered, train=False)
            continue
        if i == last_assistant and isinstance(m["content"], str):
            rendered = t.assistant + m["content"] + t.assistant_end  # the final turn keeps its <think>
        add(t.assistant, train=False)
        add(rendered[len(t.assistant) :], train=True)
    return ids, labels
