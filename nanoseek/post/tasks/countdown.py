"""Countdown: combine the given numbers, each exactly once, with + - * / and parentheses to reach a target.

The RL task of TinyZero and oat-zero (REFERENCE §10-11). As in TinyZero's checker, a correct answer is an
expression that evaluates to the target and uses *every* given number exactly once (the multisets of numbers
must be equal). Problems are built backwards: combine the numbers pairwise in a random order with random
operations that keep every intermediate result a positive integer, so every problem has a solution and its
steps are the SFT trace (`25-7=18 / 18*3=54`, answer `(25-7)*3`).

The answer is model output and is never passed to `eval`. `evaluate_expression` parses it with `ast` and walks
the tree itself, accepting only integer literals, the four binary operators and parentheses; names, calls,
attributes, unary signs, powers, floats and anything else are rejected, and the text is capped in length before
parsing so a pathological input cannot exhaust the parser. Arithmetic is exact (`Fraction`), so `(1/3)*3` is 1.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from fractions import Fraction

from nanoseek.post.tasks.base import Problem, Task, TaskError

MAX_EXPRESSION_CHARS = 200
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() \t]+")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class UnsafeExpression(ValueError):
    """An answer that is not a plain arithmetic expression over integer literals."""


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]]:
    """(exact value, integer literals in order) of an expression of + - * / and parentheses.

    Raises UnsafeExpression for anything else (and for division by zero)."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_CHARS.fullmatch(expr):
        raise UnsafeExpression("only digits, + - * /, parentheses and spaces are allowed")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnsafeExpression(f"not a valid expression ({type(e).__name__})") from None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise UnsafeExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise UnsafeExpression(f"{type(node).__name__} is not allowed")

    return walk(tree.body), literals


def check_countdown(given: str, answer: str = "", numbers=None, target=None, **fields) -> bool:
    """True iff `given` uses exactly the multiset `numbers` and evaluates to `target`."""
    if numbers is None or target is None:
        return False
    try:
        value, used = evaluate_expression(given)
    except UnsafeExpression:
        return False
    return sorted(used) == sorted(int(n) for n in numbers) and value == int(target)


class Countdown(Task):
    """Knobs: `numbers` (how many, default 3), `max_number` (each in [1, max_number]), `max_target`."""

    name = "countdown"

    def __init__(self, numbers: int = 3, max_number: int = 25, max_target: int = 100):
        if not 2 <= numbers <= 6:
            raise TaskError(f"countdown: numbers must be in [2, 6], got {numbers}")
        if max_number < 2 or max_target < 1:
            raise TaskError("countdown: max_number must be >= 2 and max_target >= 1")
        self.n, self.max_number, self.max_target = numbers, max_number, max_target

    def generate(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n)]
            built = self._combine(rng, nums)
            if built is not None:
                value, expr, steps = built
                if 1 <= value <= self.max_target:
                    break
        shown = sorted(nums)
        prompt = f"Use {', '.join(map(str, shown))} once each with + - * / to make {value}."
        fields = {"numbers": shown, "target": value}
        return Problem(self.name, prompt, expr, fields=fields, trace="\n".join(steps))

    @staticmethod
    def _combine(rng: random.Random, nums: list[int]):
        """Combine numbers pairwise at random: (value, expression, steps), or None on a dead end."""
        pool = [(n, str(n)) for n in nums]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (a, ea), (b, eb) = pool[i], pool[j]
            if a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)
            ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            wrap = lambda e: e if e.isdigit() else f"({e})"  # noqa: E731
            steps.append(f"{a}{op}{b}={value}")
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"{wrap(ea)}{op}{wrap(eb)}")]
        value, expr = pool[0]
        return (value, expr, steps) if value > 0 else None

    check = staticmethod(check_countdown)
