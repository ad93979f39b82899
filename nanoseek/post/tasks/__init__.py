"""Verifiable tasks: generators with difficulty knobs, disjoint train/test splits, worked traces, checkers.

A task spec names a task and its knobs: `mul`, `mul:digits=3,digits_b=2`, `add:digits=4,operands=3`,
`countdown:numbers=4`, `linear:coef=5`, a problems file `path/to/problems.jsonl`, or a mixture joined by `+`
(`add:digits=3+mul:digits=2`: each problem is drawn from one of them uniformly).

| task      | module        | answer checked by                                        |
|-----------|---------------|----------------------------------------------------------|
| add, sub, mul | arithmetic.py | integer equality                                     |
| countdown | countdown.py  | safe `ast` evaluation, every number used exactly once    |
| linear    | linear.py     | integer equality                                         |
| jsonl     | jsonl.py      | trimmed text, or exact numbers when both parse as numbers |
"""

from __future__ import annotations

import random
from pathlib import Path

from nanoseek.post.tasks.arithmetic import Arithmetic
from nanoseek.post.tasks.base import Problem, Task, TaskError, check_integer, extract_answer, split_of
from nanoseek.post.tasks.countdown import Countdown, check_countdown, evaluate_expression
from nanoseek.post.tasks.jsonl import JsonlTask, check_match
from nanoseek.post.tasks.linear import Linear

BUILDERS = {
    "add": lambda **k: Arithmetic("add", **k),
    "sub": lambda **k: Arithmetic("sub", **k),
    "mul": lambda **k: Arithmetic("mul", **k),
    "countdown": Countdown,
    "linear": Linear,
}
CHECKERS = {
    "add": check_integer,
    "sub": check_integer,
    "mul": check_integer,
    "linear": check_integer,
    "countdown": check_countdown,
    "jsonl": check_match,
}


class Mixture(Task):
    """Draw each problem from one of several tasks, uniformly."""

    name = "mixture"

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks

    def generate(self, rng: random.Random) -> Problem:
        return rng.choice(self.tasks).generate(rng)

    def split(self, problem: Problem) -> str:
        task = next(t for t in self.tasks if t.name == problem.task)
        return task.split(problem)


def make_task(spec: str) -> Task:
    """Build a task from its spec (see the module docstring). Raises TaskError with the reason."""
    spec = spec.strip()
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return JsonlTask(spec)
    if "+" in spec:
        return Mixture([make_task(s) for s in spec.split("+")])
    name, _, knob_text = spec.partition(":")
    if name not in BUILDERS:
        raise TaskError(f"task: unknown task {name!r}; choose from {', '.join(BUILDERS)} or a .jsonl file")
    knobs = {}
    for item in filter(None, (k.strip() for k in knob_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise TaskError(f"task {name}: knob {item!r} must look like name=integer")
        knobs[key.strip()] = int(value)
    try:
        return BUILDERS[name](**knobs)
    except TypeError:
        raise TaskError(f"task {name}: unknown knob in {knob_text!r}") from None


def check_answer(task: str, given: str, answer: str, **fields) -> bool:
    """Dispatch to the checker of `task` (the `task` field of a Problem)."""
    checker = CHECKERS.get(task)
    if checker is None:
        raise TaskError(f"no checker for task {task!r}")
    return checker(given, answer, **fields)


__all__ = [
    "CHECKERS",
    "Problem",
    "Task",
    "TaskError",
    "check_answer",
    "evaluate_expression",
    "extract_answer",
    "make_task",
    "split_of",
]
