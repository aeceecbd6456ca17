"""Argument types shared by the commands: each names the bad value and what was expected."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Iterable

#: What a negative number looks like on the command line, exponents and infinities included
#: (argparse alone takes ``-1e-3`` or ``-inf`` for an unknown option and says the flag before it
#: lacks its value).
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` and its subcommands read every negative number as a value (``--alpha -1e-3``),
    so the flag's own type check names it rather than argparse missing it."""
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = NEGATIVE_NUMBER
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                accept_negative_numbers(sub)


def int_at_least(text: str, low: int, expected: str) -> int:
    """``text`` as an integer ``>= low``; an ``ArgumentTypeError`` naming it and ``expected`` otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (NaN and infinities are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32 - 1] (what torch and numpy both take)."""
    value = int_at_least(text, 0, "a seed (an integer >= 0)")
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {2**32 - 1}], got {text}")
    return value


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    from pyro_vae.train.config import check_device_name

    try:
        return check_device_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}") from None


def part_name(kind: str, names: Iterable[str]) -> Callable[[str], str]:
    """A registry name of a part, or an import path ``package.module:Name`` to a user's part."""
    known = list(names)

    def parse(text: str) -> str:
        if text in known or ":" in text:
            return text
        raise argparse.ArgumentTypeError(f"unknown {kind} {text!r}; expected one of {', '.join(known)}, "
                                         "or an import path package.module:Name")
    parse.__name__ = kind
    return parse
