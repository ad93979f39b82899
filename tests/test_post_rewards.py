"""Rewards (nanoseek/post/rewards.py): format and accuracy on malformed outputs, weights, user functions by
import path, and failures that score 0 and are counted instead of killing the run."""

import pytest
from post_helpers import tokenizer  # noqa: F401  (puts tests/ helpers on the import path for import-path specs)

from nanoseek.post.rewards import (
    RewardError,
    RewardSet,
    accuracy_reward,
    digits_reward,
    format_reward,
    load_reward,
    parse_reward_spec,
)

GOOD = "<think>47*6=282</think><answer>282</answer>"


@pytest.mark.parametrize(
    "completion,ok",
    [
        (GOOD, True),
        ("  <think>\nx\n</think>\n<answer> 282 </answer>\n", True),
        ("<think></think><answer></answer>", True),  # empty is well formed (accuracy decides the rest)
        ("<answer>282</answer>", False),  # missing think
        ("<think>x</think>", False),  # missing answer
        ("<think>x</think>282", False),
        ("<think>x<think>y</think><answer>1</answer>", False),  # repeated opening tag
        ("<think>x</think><answer>1</answer></answer>", False),  # repeated closing tag (TinyZero hole)
        ("<think>x</think><answer>1</answer><answer>2</answer>", False),
        ("<answer>1</answer><think>x</think>", False),  # wrong order
        ("<think>x</think>junk<answer>1</answer>", False),  # text between the blocks
        ("<think>x</think><answer>1</answer> trailing", False),
        ("</think><think>x<answer>1</answer>", False),
        ("", False),
        ("\x00\ufffd garbage \U0001f600", False),
    ],
)
def test_format_reward_accepts_only_one_think_then_one_answer(completion, ok):
    assert format_reward(["q"], [completion]) == [1.0 if ok else 0.0]


@pytest.mark.parametrize(
    "completion,reward",
    [
        (GOOD, 1.0),
        ("<answer>282</answer>", 1.0),  # accuracy ignores the think block: format is a separate reward
        ("<think>x</think><answer>283</answer>", 0.0),
        ("<think>x</think><answer>282</answer><answer>282</answer>", 0.0),  # repeated answers never pay
        ("<think>282</think>", 0.0),  # the right number outside <answer>
        ("282", 0.0),
        ("<answer>two hundred</answer>", 0.0),
        ("", 0.0),
        ("<answer>" * 50, 0.0),
    ],
)
def test_accuracy_reward_on_malformed_outputs(completion, reward):
    assert accuracy_reward(["q"], [completion], task=["mul"], answer=["282"]) == [reward]


def test_accuracy_reward_uses_each_tasks_checker_and_fields():
    out = accuracy_reward(
        ["a", "b", "c"],
        ["<answer>(25-7)*3</answer>", "<answer>25*3</answer>", "<answer>54</answer>"],
        task=["countdown", "countdown", "mul"],
        answer=["(25-7)*3", "(25-7)*3", "54"],
        numbers=[[3, 7, 25], [3, 7, 25], None],
        target=[54, 54, None],
    )
    assert out == [1.0, 0.0, 1.0]


def test_reward_set_is_the_weighted_sum():
    rs = RewardSet.from_specs(["accuracy", "format=0.25"])
    res = rs(["q", "q"], [GOOD, "<answer>282</answer>"], [{"task": "mul", "answer": "282"}] * 2)
    assert res.total == [1.25, 1.0]
    assert res.per_function == {"accuracy": [1.0, 1.0], "format": [1.0, 0.0]}
    assert res.failures == {"accuracy": 0, "format": 0}


def test_user_reward_loads_by_import_path_with_weight():
    name, fn, w = parse_reward_spec("post_helpers:digit_reward=0.5")
    assert name == "post_helpers:digit_reward" and w == 0.5
    assert fn(["q"], ["ab12"]) == [0.5]
    assert load_reward("accuracy") is accuracy_reward


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nope", "not a built-in"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("post_helpers:missing", "no callable"),
        ("post_helpers:NOT_CALLABLE", "no callable"),
        ("accuracy=heavy", "not a number"),
        ("accuracy=inf", "finite"),
    ],
)
def test_bad_reward_specs_raise_one_clear_error(spec, message):
    with pytest.raises(RewardError, match=message):
        parse_reward_spec(spec)


def test_a_raising_reward_scores_zero_and_is_counted_not_fatal():
    rs = RewardSet.from_specs(["post_helpers:raising_reward", "format"])
    res = rs(["q"] * 3, [GOOD, "x", GOOD], [{"task": "mul", "answer": "282"}] * 3)
    assert res.per_function["post_helpers:raising_reward"] == [0.0, 0.0, 0.0]
    assert res.failures["post_helpers:raising_reward"] == 3
    assert "always fails" in res.errors["post_helpers:raising_reward"]
    assert res.total == [1.0, 0.0, 1.0]  # the other reward still counts


def test_only_the_samples_that_make_a_reward_raise_score_zero():
    rs = RewardSet.from_specs(["post_helpers:picky_reward"])
    res = rs(["q"] * 4, ["a", "xb", "c", "xd"], [{}] * 4)
    assert res.total == [1.0, 0.0, 1.0, 0.0]
    assert res.failures == {"post_helpers:picky_reward": 2}


def test_garbage_return_values_count_as_failures_and_none_as_not_applicable():
    def weird(prompts, completions, **kw):
        return [None, float("nan"), "1", True, 2][: len(completions)] if len(completions) == 5 else [0.5]

    res = RewardSet([("weird", weird, 1.0)])(["q"] * 5, ["a"] * 5, [{}] * 5)
    assert res.total == [0.0, 0.0, 0.0, 0.0, 2.0]
    assert res.failures == {"weird": 3}  # nan, a string, a bool; None is "not applicable"

    def wrong_length(prompts, completions, **kw):
        return [1.0] * (len(completions) + 1)

    res = RewardSet([("short", wrong_length, 1.0)])(["q"] * 2, ["a", "b"], [{}] * 2)
    assert res.total == [0.0, 0.0] and res.failures == {"short": 2}


def test_digits_reward_gives_partial_credit_by_place_and_charges_wrong_lengths():
    def wrap(a):
        return f"<think>x</think><answer>{a}</answer>"

    got = digits_reward(
        ["q"] * 7,
        [wrap("47"), wrap("97"), wrap("147"), wrap("7"), wrap("-47"), "no answer", wrap("forty")],
        answer=["47"] * 7,
    )
    assert got == [1.0, 0.5, 2 / 3, 0.5, 0.0, 0.0, 0.0]
    # not applicable (None, not a failure) where the answer is not an integer, e.g. a countdown expression
    assert digits_reward(["q"], [wrap("1+2")], answer=["(1+2)*3"]) == [None]
    assert digits_reward(["q"], [wrap("-12")], answer=["-12"]) == [1.0]
