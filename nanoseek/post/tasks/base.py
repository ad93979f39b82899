"""What every verifiable task shares: the `Problem` record, the `Task` interface, the train/test split, and
reading the model's answer out of `<answer>...</answer>`.

A task is a deterministic generator of problems with difficulty knobs, a worked solution for SFT traces, and a
checker for the reward (DeepSeek-R1 §2.2.2: rule-based accuracy rewards only, no neural reward model).

The split is a property of the problem, not of the draw: a problem is a test problem iff the hash of
`task + prompt` falls in the test fraction (`split_of`). Training draws skip test problems, so the two sets are
disjoint whatever the seeds, the sizes or the order of generation, and the held-out accuracy measures
generalization, never recall. (A small problem space, e.g. 1-digit addition, simply has a small test set.)
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from nanoseek.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

SPLITS = ("train", "test")
_ANSWER_RE = re.compile(re.escape(ANSWER) + r"(.*?)" + re.escape(END_ANSWER), re.DOTALL)


class TaskError(ValueError):
    """A task spec that cannot be built (unknown task, bad knob) or a problem file that cannot be read."""


@dataclass(frozen=True)
class Problem:
    """One question. `fields` holds what the checker needs besides the answer (countdown: numbers, target)."""

    task: str
    prompt: str
    answer: str
    fields: dict = field(default_factory=dict, hash=False, compare=False)
    trace: str | None = field(default=None, hash=False, compare=False)  # worked reasoning for SFT

    def reward_fields(self) -> dict:
        """The keyword arguments a reward function receives for this problem (one entry of each list)."""
        return {"task": self.task, "answer": self.answer, **self.fields}

    def solution(self) -> str:
        """The R1 output format of a worked solution: `<think>trace</think><answer>answer</answer>`."""
        return f"{THINK}{self.trace or ''}{END_THINK}{ANSWER}{self.answer}{END_ANSWER}"


def split_of(task: str, prompt: str, test_fraction: float) -> str:
    """'test' for a fixed pseudo-random `test_fraction` of all prompts of a task, else 'train'."""
    h = int.from_bytes(hashlib.sha256(f"{task}\x00{prompt}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


class Task:
    """Base class: subclasses set `name` and implement `generate` (one random problem, any split) and `check`."""

    name = "task"
    test_fraction = 0.1

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    @staticmethod
    def check(given: str, answer: str, **fields) -> bool:
        """Is `given` (the text inside <answer>) a correct answer? Never raises on model output."""
        raise NotImplementedError

    def split(self, problem: Problem) -> str:
        return split_of(problem.task, problem.prompt, self.test_fraction)

    def stream(self, split: str, seed: int) -> Iterator[Problem]:
        """Endless problems of one split (repeats allowed), reproducible from the seed."""
        if split not in SPLITS:
            raise TaskError(f"split: must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}-{split}-{seed}")
        misses = 0
        while True:
            p = self.generate(rng)
            if self.split(p) == split:
                misses = 0
                yield p
            else:
                misses += 1
                if misses > 10_000:
                    raise TaskError(f"{self.name}: no {split} problems found (problem space too small?)")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """Up to n distinct problems of one split (fewer if the split holds fewer), in a fixed order."""
        out: dict[str, Problem] = {}
        stream = self.stream(split, seed)
        for _ in range(50 * n + 1000):
            if len(out) >= n:
                break
            p = next(stream)
            out.setdefault(p.prompt, p)
        return list(out.values())


# ---- reading model output -------------------------------------------------------------------------------------
def extract_answer(completion: str) -> str | None:
    """The text of the single `<answer>...</answer>` block, stripped; None if there is none or more than one.

    Several answer blocks count as no answer: otherwise a policy could list candidates and collect the reward.
    """
    if completion.count(ANSWER) != 1 or completion.count(END_ANSWER) != 1:
        return None
    m = _ANSWER_RE.search(completion)
    return m.group(1).strip() if m else None


def parse_int(text: str) -> int | None:
    """An integer written plainly ('-42', ' 1692 '); None for anything else (no '1,692', no '1e3')."""
    text = text.strip()
    if not re.fullmatch(r"[+-]?\d{1,60}", text):
        return None
    return int(text)


def check_integer(given: str, answer: str, **fields) -> bool:
    value = parse_int(given)
    return value is not None and value == int(answer)
