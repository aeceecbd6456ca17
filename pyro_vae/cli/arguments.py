"""Argument types shared by the commands: each names the bad value and what was expected."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Iterable


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
