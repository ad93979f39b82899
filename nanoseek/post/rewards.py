"""Rule-based rewards (DeepSeek-R1 §2.2.2) and the user reward interface.

Built-ins:
- `accuracy`: 1.0 iff the completion holds exactly one `<answer>...</answer>` and the task's checker accepts its
  text (tasks/__init__.py); else 0.0. Several answer blocks score 0, so listing candidates is never rewarded.
- `digits`: partial credit for integer answers, the share of matching digit places (see digits_reward).
- `format`: 1.0 iff the completion is exactly `<think>...</think><answer>...</answer>` (whitespace allowed between
  and around the blocks, none of the four tags repeated or nested); else 0.0. This is stricter than TRL's
  `think_format_reward` (which checks only the think block): it also closes the repeated-`</answer>` hole
  reported for TinyZero (REFERENCE §10).

A reward function is any callable `(prompts, completions, **task_fields) -> list[float]`, as in TRL: `prompts`
and `completions` are lists of strings of equal length, and every task field arrives as a keyword whose value is
the list of that field over the batch (`task`, `answer`, and e.g. `numbers`, `target` for countdown); accept
`**kwargs` to ignore the rest. User functions are named by import path: `--reward mypkg.rewards:fn=0.5`.

`RewardSet` sums the functions with their weights and never lets one sample's failure kill a run: if a call
raises, each sample is retried alone; a sample whose call still raises, or that returns something other than a
finite number, scores 0.0 for that function and is counted in `failures[name]` (logged every step). `None` means
"not applicable" (TRL's convention) and scores 0.0 without counting as a failure. A function that fails on every
sample of GRPO's first step is broken, not unlucky, and stops the run there (grpo.py).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nanoseek.post.tasks import check_answer, extract_answer
from nanoseek.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

RewardFn = Callable[..., list]

_TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
_FORMAT_RE = re.compile(
    r"\s*" + re.escape(THINK) + r"(.*?)" + re.escape(END_THINK) + r"\s*" + re.escape(ANSWER) + r"(.*?)"
    r"" + re.escape(END_ANSWER) + r"\s*",
    re.DOTALL,
)


class RewardError(ValueError):
    """A reward spec that cannot be loaded (unknown name, missing module, not callable, bad weight)."""


# ---- built-in rewards ---------------------------------------------------------------------------------------
def format_reward(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    return [1.0 if _well_formed(c) else 0.0 for c in completions]


def _well_formed(completion: str) -> bool:
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return False
    return _FORMAT_RE.fullmatch(completion) is not None


def accuracy_reward(
    prompts: Sequence[str], completions: Sequence[str], task: Sequence[str], answer: Sequence[str], **fields
) -> list[float]:
    out = []
    for i, completion in enumerate(completions):
        given = extract_answer(completion)
        row = {k: v[i] for k, v in fields.items()}
        ok = given is not None and check_answer(task[i], given, answer[i], **row)
        out.append(1.0 if ok else 0.0)
    return out


def digits_reward(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **fields
) -> list[float | None]:
    """Partial credit for integer answers: the share of digit places (aligned from the units) that match.

    `(#places where the given and expected digits agree) / (the longer length)`, so a wrong length costs, and a
    sign mismatch scores 0. Not in R1, whose rewards are all-or-nothing; it exists because a tiny policy on
    multi-digit arithmetic samples few fully correct answers, so most GRPO groups are all-zero under `accuracy`
    and carry no gradient (docs/post_training.md). None (not applicable) where the expected answer is not an
    integer, e.g. countdown's expressions.
    """
    out: list[float | None] = []
    for completion, expected in zip(completions, answer):
        expected = str(expected).strip()
        if not re.fullmatch(r"-?\d+", expected):
            out.append(None)
            continue
        given = (extract_answer(completion) or "").strip().replace(",", "")
        if not re.fullmatch(r"-?\d+", given) or given.startswith("-") != expected.startswith("-"):
            out.append(0.0)
            continue
        g, e = given.lstrip("-")[::-1], expected.lstrip("-")[::-1]
        out.append(sum(a == b for a, b in zip(g, e)) / max(len(g), len(e)))
    return out


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "digits": digits_reward}


# ---- loading ------------------------------------------------------------------------------------------------
def load_reward(name: str) -> RewardFn:
    """A built-in by name, or `module.path:function` imported from the Python path."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr:
        raise RewardError(
            f"reward {name!r}: not a built-in ({', '.join(BUILTIN)}) nor an import path module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {name!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {name!r}: {module_name} has no callable {attr!r}")
    return fn


def parse_reward_spec(spec: str) -> tuple[str, RewardFn, float]:
    """'accuracy' | 'format=0.1' | 'pkg.mod:fn=0.5' -> (name, function, weight); the weight defaults to 1."""
    name, eq, weight_text = spec.strip().rpartition("=") if "=" in spec else (spec.strip(), "", "")
    try:
        weight = float(weight_text) if eq else 1.0
    except ValueError:
        raise RewardError(f"reward {spec!r}: weight {weight_text!r} is not a number") from None
    if not math.isfinite(weight):
        raise RewardError(f"reward {spec!r}: weight must be finite")
    return name, load_reward(name), weight


@dataclass
class RewardResult:
    total: list[float]  # weighted sum per sample
    per_function: dict[str, list[float]]  # unweighted, per function
    failures: dict[str, int]  # samples per function that raised or returned garbage
    errors: dict[str, str]  # the first error message per failing function


class RewardSet:
    """Weighted sum of reward functions, robust to functions that raise (see the module docstring)."""

    def __init__(self, rewards: Sequence[tuple[str, RewardFn, float]]):
        if not rewards:
            raise RewardError("give at least one reward function")
        names = [n for n, _, _ in rewards]
        if len(set(names)) != len(names):
            raise RewardError(f"reward names must be unique, got {names}")
        self.rewards = list(rewards)

    @classmethod
    def from_specs(cls, specs: Sequence[str]) -> RewardSet:
        return cls([parse_reward_spec(s) for s in specs])

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.rewards]

    def __call__(self, prompts: list[str], completions: list[str], fields: list[dict]) -> RewardResult:
        n = len(completions)
        cols = columns(fields)
        total = [0.0] * n
        per_function, failures, errors = {}, {}, {}
        for name, fn, weight in self.rewards:
            values, failed, error = _call_safely(fn, prompts, completions, cols)
            per_function[name], failures[name] = values, failed
            if error:
                errors[name] = error
            total = [t + weight * v for t, v in zip(total, values)]
        return RewardResult(total, per_function, failures, errors)


def columns(fields: list[dict]) -> dict[str, list]:
    """Per-sample dicts -> one list per key (a key missing from a sample gives None there)."""
    keys = dict.fromkeys(k for f in fields for k in f)
    return {k: [f.get(k) for f in fields] for k in keys}


def _call_safely(fn: RewardFn, prompts, completions, cols) -> tuple[list[float], int, str]:
    n = len(completions)
    try:
        out = fn(list(prompts), list(completions), **cols)
        if isinstance(out, list | tuple) and len(out) == n:
            values = [_clean(v) for v in out]
            return [0.0 if v is None else v for v in values], sum(v is None for v in values), ""
        error = (
            f"returned {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}, not {n}"
        )
    except Exception as e:  # a user function: anything can happen
        error = f"{type(e).__name__}: {e}"
    values, failed = [], 0
    for i in range(n):  # isolate the failing samples
        try:
            one = fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in cols.items()})
            v = _clean(one[0]) if isinstance(one, list | tuple) and len(one) == 1 else None
        except Exception as e:
            error, v = error or f"{type(e).__name__}: {e}", None
        failed += v is None
        values.append(0.0 if v is None else v)
    return values, failed, error


def _clean(v) -> float | None:
    """A finite float; None (a failure) for anything else. A None reward means 'not applicable': 0.0."""
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)
