"""Multi-digit addition, subtraction and multiplication, with worked scratchpads for SFT traces.

Why scratchpads: a small transformer writing a sum left to right must know every carry before its first digit.
Column-by-column reasoning, least significant digit first, turns that into local steps (Lee et al., "Teaching
Arithmetic to Small Transformers", arXiv 2307.03381: scratchpad/reversed formats learn far faster than plain
ones). Each scratchpad line carries the running partial result, so the final answer is a copy of the last line
rather than a reversal. Multiplication writes one partial product per digit of the second operand, then their
sum; plain multi-digit multiplication without such a chain of thought is nearly unlearnable for small models
(REFERENCE §11, arXiv 2510.00184), which makes it a good RL target: RL can only sharpen a nonzero pass@k.

    add  347+285  ->  7+5=12, 2 / 4+8+1=13, 32 / 3+2+1=6, 632                       answer 632
    sub  347-285  ->  7-5=2, 2 / 14-8=6, 62 / 3-2-1=0, 062                           answer 62
    mul  47*36    ->  47*6=282 / 47*30=1410 / 282+1410=1692                          answer 1692
(lines are separated by newlines; `14-8` means the column borrowed 10, `-1` that it lends to the next one.)

Knobs: `digits` (most digits per operand), `min_digits` (fewest), `operands` (add: how many numbers),
`digits_b` (mul: digits of the second operand, default `digits`).
"""

from __future__ import annotations

import random

from nanoseek.post.tasks.base import Problem, Task, TaskError, check_integer


def _number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _digits_lsb(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def addition_trace(operands: list[int]) -> str:
    cols = [_digits_lsb(x) for x in operands]
    width = max(len(c) for c in cols)
    carry, partial, lines = 0, "", []
    for i in range(width):
        terms = [c[i] for c in cols if i < len(c)] + ([carry] if carry else [])
        s = sum(terms)
        last = i == width - 1
        partial = (str(s) if last else str(s % 10)) + partial
        lines.append(f"{'+'.join(map(str, terms))}={s}, {partial}")
        carry = s // 10
    return "\n".join(lines)


def subtraction_trace(a: int, b: int) -> str:
    """a - b for a >= b >= 0, column by column with borrows."""
    da, db = _digits_lsb(a), _digits_lsb(b)
    borrow, partial, lines = 0, "", []
    for i in range(len(da)):
        top, bottom = da[i], db[i] if i < len(db) else 0
        lend = 1 if top - borrow < bottom else 0  # this column borrows 10 from the next
        top += 10 * lend
        expr = f"{top}-{bottom}" + ("-1" if borrow else "")
        digit = top - bottom - borrow
        partial = str(digit) + partial
        lines.append(f"{expr}={digit}, {partial}")
        borrow = lend
    return "\n".join(lines)


def multiplication_trace(a: int, b: int) -> str:
    partials = [a * d * 10**i for i, d in enumerate(_digits_lsb(b))]
    lines = [f"{a}*{d * 10**i}={p}" for i, (d, p) in enumerate(zip(_digits_lsb(b), partials))]
    if len(partials) > 1:
        lines.append(f"{'+'.join(map(str, partials))}={a * b}")
    return "\n".join(lines)


class Arithmetic(Task):
    """`op` in {add, sub, mul}; prompts look like 'What is 47*36?'."""

    OPS = {"add": "+", "sub": "-", "mul": "*"}

    def __init__(
        self,
        op: str,
        digits: int = 3,
        min_digits: int = 1,
        operands: int = 2,
        digits_b: int | None = None,
    ):
        if op not in self.OPS:
            raise TaskError(f"arithmetic op must be one of {sorted(self.OPS)}, got {op!r}")
        if not 1 <= min_digits <= digits <= 30:
            raise TaskError(f"{op}: need 1 <= min_digits <= digits <= 30, got {min_digits}, {digits}")
        if operands < 2 or (operands > 2 and op != "add"):
            raise TaskError(f"{op}: operands must be 2 (or more for add), got {operands}")
        if digits_b is not None and not 1 <= digits_b <= 30:
            raise TaskError(f"{op}: digits_b must be in [1, 30], got {digits_b}")
        self.name, self.op = op, op
        self.digits, self.min_digits, self.operands = digits, min_digits, operands
        self.digits_b = digits_b or digits

    def generate(self, rng: random.Random) -> Problem:
        sym = self.OPS[self.op]
        if self.op == "add":
            xs = [_number(rng, self.min_digits, self.digits) for _ in range(self.operands)]
            answer, trace = sum(xs), addition_trace(xs)
        elif self.op == "sub":
            a, b = sorted((_number(rng, self.min_digits, self.digits) for _ in range(2)), reverse=True)
            xs, answer, trace = [a, b], a - b, subtraction_trace(a, b)
        else:
            a = _number(rng, self.min_digits, self.digits)
            b = _number(rng, min(self.min_digits, self.digits_b), self.digits_b)
            xs, answer, trace = [a, b], a * b, multiplication_trace(a, b)
        prompt = f"What is {sym.join(map(str, xs))}?"
        return Problem(self.name, prompt, str(answer), trace=trace)

    check = staticmethod(check_integer)
