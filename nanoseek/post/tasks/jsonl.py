"""User problems: a JSONL file of `{"prompt": ..., "answer": ...}` objects (extra keys become reward fields).

The checker compares the text inside `<answer>` with the reference after trimming whitespace; when both read as
numbers (`42`, `-3.5`, `1/4`) they are compared as exact numbers, so `0.5` matches `1/2`. An optional "trace"
key holds worked reasoning, used when the file feeds SFT. Train and test splits are hash-based on the prompt,
as for the generated tasks.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

from nanoseek.post.tasks.base import Problem, Task, TaskError


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        return None


def check_match(given: str, answer: str, **fields) -> bool:
    given, answer = given.strip(), str(answer).strip()
    if given == answer:
        return True
    a, b = _as_number(given), _as_number(answer)
    return a is not None and a == b


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str | Path, test_fraction: float = 0.1):
        self.path = Path(path)
        self.test_fraction = test_fraction
        self.items = load_problems(self.path)

    def generate(self, rng: random.Random) -> Problem:
        return rng.choice(self.items)

    check = staticmethod(check_match)


def load_problems(path: Path) -> list[Problem]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise TaskError(f"{path}: cannot read problems ({e.strerror or e})") from None
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise TaskError(f'{path}:{i}: each line must be an object with a string "prompt"')
        if "answer" not in obj or isinstance(obj["answer"], dict | list) or obj["answer"] is None:
            raise TaskError(f'{path}:{i}: "answer" must be a string or a number')
        extra = {k: v for k, v in obj.items() if k not in ("prompt", "answer", "trace")}
        trace = obj.get("trace") if isinstance(obj.get("trace"), str) else None
        items.append(Problem("jsonl", obj["prompt"], str(obj["answer"]), fields=extra, trace=trace))
    if not items:
        raise TaskError(f"{path}: no problems")
    return items
