"""Argument types shared by the commands: each names the bad value and what was expected."""

from __future__ import annotations

import argparse
from typing import Callable, Iterable


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


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
