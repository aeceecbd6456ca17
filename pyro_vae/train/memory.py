"""Refuse requests that cannot fit in memory before allocating them.

Allocating far more than the machine has either raises deep inside torch or,
worse, gets the process killed by the operating system with nothing saved.
:func:`check_fits` compares an estimate with the memory available now (the
machine's, a container's limit, or the GPU's) and raises :class:`TooLarge`
naming the numbers that make the request large.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

#: Labels beyond this many classes are not one-hot encoded by a conditional model.
MAX_CLASSES = 10_000
#: Share of the available memory one request may plan to use.
USABLE_FRACTION = 0.8


class TooLarge(ValueError):
    """A request needs more memory than is available."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return None if limit == "max" else max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can use on ``device`` now, in bytes; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(candidates) if candidates else None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def check_fits(needed: float, what: str, hint: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`TooLarge` when ``needed`` bytes exceed the usable memory of ``device``.

    ``what`` names the request and its sizes (``"particles 100000 x batch 128 x 784 features"``),
    ``hint`` says what to lower.
    """
    if not math.isfinite(needed):
        raise TooLarge(f"{what} is too large to compute; {hint}")
    available = available_bytes(device)
    if available is None:
        return
    if needed > USABLE_FRACTION * available:
        raise TooLarge(f"{what} needs about {fmt_bytes(needed)} of memory, more than the "
                       f"{fmt_bytes(available)} available on {torch.device(device).type}; {hint}")


def check_num_classes(num_classes: int | None, what: str) -> None:
    """Refuse labels too many to one-hot encode (a label of 10**9 means 10**9 classes)."""
    if num_classes is not None and num_classes > MAX_CLASSES:
        raise TooLarge(f"{what} has labels up to {num_classes - 1}, i.e. {num_classes} classes; a conditional "
                       f"model one-hot encodes labels and supports at most {MAX_CLASSES} classes: relabel the "
                       "classes 0..K-1, or train without --conditional")
