"""Shared pieces of the command line: the one-line usage error and validated argument types.

Every subcommand module (`nanoseek/cli.py`, `nanoseek/<area>/commands.py`) takes its flag types from here, so
`--steps 0` or `--tokens 14.8T` behave the same everywhere. An `ArgumentTypeError` becomes
`nanoseek: error: argument --x: ...`.
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad command-line input; reported as one line."""


# ---- argument types: an ArgumentTypeError becomes "argument --x: ..." -------------------------------------
_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def _number(text: str) -> float:
    """'14.8e12', '14.8T', '180000', '2.5' -> float (K/M/B/T suffixes allowed)."""
    s = text.strip()
    scale = _SUFFIXES.get(s[-1:].upper(), 1.0) if s else 1.0
    if scale != 1.0:
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 14.8e12 or 14.8T)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def positive_int(text: str) -> int:
    value = _number(text)
    if value <= 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(value)


def non_negative_int(text: str) -> int:
    value = _number(text)
    if value < 0 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return int(value)


def unit_interval(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1]")
    return value


def fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1], e.g. 0.35 for 35%")
    return value
