"""Save and restore the random state around work that must leave no trace."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put torch's CPU and (initialized) CUDA generators back as they were.

    A probe run (guessing the plate nesting, checking an estimator against Pyro)
    then changes none of the draws that training or evaluation make afterwards.
    """
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def get_rng_state() -> tuple:
    """torch's CPU generator state and, when CUDA is initialized, every CUDA generator's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def set_rng_state(state: tuple) -> None:
    """Put back a :func:`get_rng_state`."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
