"""Prompt formats and the SFT encoding (nanoseek/post/chat.py): assistant-only labels, R1-Zero template."""

import pytest
from post_helpers import tokenizer

from nanoseek.infer.chat import ChatTemplateError, template_for
from nanoseek.post.chat import IGNORE, R1_ZERO_TEMPLATE, encode_conversation, prompt_format

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3*4?"},
    {"role": "assistant", "content": "<think>3*4=12</think><answer>12</answer>"},
]


def _trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_only_the_assistant_turn_and_its_end_token_are_trained():
    tok = tokenizer()
    ids, labels = encode_conversation(tok, CONV)
    assert len(ids) == len(labels)
    assert _trained_text(tok, ids, labels) == "<think>3*4=12</think><answer>12</answer><|end|>"
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))


def test_piecewise_encoding_equals_encoding_the_rendered_conversation():
    tok = tokenizer()
    ids, _ = encode_conversation(tok, CONV)
    t = template_for(tok)
    whole = t.bos + t.system + "Be brief." + t.end + t.user + "What is 3*4?" + t.end + t.assistant
    whole += CONV[2]["content"] + t.assistant_end
    assert ids == tok.encode(whole)


def test_prompt_part_matches_the_r1_generation_prompt():
    tok = tokenizer()
    ids, labels = encode_conversation(tok, CONV[1:])
    first_trained = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert ids[:first_trained] == prompt_format(tok, "r1").prompt_ids("What is 3*4?")


def test_earlier_assistant_turns_lose_their_thinking_but_are_still_trained():
    tok = tokenizer()
    conv = CONV[1:] + [
        {"role": "user", "content": "And 2*4?"},
        {"role": "assistant", "content": "<think>2*4=8</think><answer>8</answer>"},
    ]
    ids, labels = encode_conversation(tok, conv)
    assert (
        _trained_text(tok, ids, labels)
        == "<answer>12</answer><|end|><think>2*4=8</think><answer>8</answer><|end|>"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "hi"}],
        [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}],
        [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}],
    ],
)
def test_bad_conversations_raise_chat_template_error(messages):
    with pytest.raises(ChatTemplateError):
        encode_conversation(tokenizer(), messages)


def test_r1_zero_prompt_is_the_verbatim_template_with_the_question():
    tok = tokenizer()
    fmt = prompt_format(tok, "r1-zero")
    text = tok.decode(fmt.prompt_ids("What is 3*4?"))
    assert text.startswith("<|bos|>A conversation between User and Assistant.")
    assert text.endswith("User: What is 3*4?. Assistant:")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1_ZERO_TEMPLATE
    assert fmt.stop_id == tok.token_id("</answer>") and fmt.stop_in_text
    ids = tok.encode("<think>x</think> <answer>12</answer>")
    assert fmt.completion_text(ids) == "<think>x</think> <answer>12</answer>"


def test_r1_completion_text_drops_the_end_of_turn_token():
    tok = tokenizer()
    fmt = prompt_format(tok, "r1")
    assert fmt.stop_id == tok.token_id("<|end|>") and not fmt.stop_in_text
    assert fmt.completion_text(tok.encode("<answer>1</answer><|end|>")) == "<answer>1</answer>"
    assert fmt.completion_text(tok.encode("<answer>1")) == "<answer>1"
    with pytest.raises(ChatTemplateError, match="mode"):
        prompt_format(tok, "zero")
