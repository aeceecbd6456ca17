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
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
