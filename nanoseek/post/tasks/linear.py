"""Linear equations `a x + b = c` with an integer solution: a two-step task (isolate, then divide).

    Solve 3x-7=8 for x.   ->   3x=8+7=15 / x=15/3=5          answer 5

Knobs: `coef` (a in [2, coef]), `max_b` (|b| <= max_b, b != 0), `max_x` (|x| <= max_x). Negative numbers appear
in b, c and x, so the task also exercises signs, which the other arithmetic tasks avoid.
"""

from __future__ import annotations

import random

from nanoseek.post.tasks.base import Problem, Task, TaskError, check_integer


class Linear(Task):
    name = "linear"

    def __init__(self, coef: int = 9, max_b: int = 50, max_x: int = 20):
        if coef < 2 or max_b < 1 or max_x < 1:
            raise TaskError("linear: need coef >= 2, max_b >= 1, max_x >= 1")
        self.coef, self.max_b, self.max_x = coef, max_b, max_x

    def generate(self, rng: random.Random) -> Problem:
        a = rng.randint(2, self.coef)
        b = rng.randint(1, self.max_b) * rng.choice((1, -1))
        x = rng.randint(-self.max_x, self.max_x)
        c = a * x + b
        sign = "+" if b > 0 else "-"
        undo = "-" if b > 0 else "+"
        trace = f"{a}x={c}{undo}{abs(b)}={a * x}\nx={a * x}/{a}={x}"
        return Problem(self.name, f"Solve {a}x{sign}{abs(b)}={c} for x.", str(x), trace=trace)

    check = staticmethod(check_integer)
