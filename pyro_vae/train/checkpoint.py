"""Atomic, safe checkpoints.

A checkpoint is a plain dict of tensors and primitive values, written to a
temporary file in the same folder, flushed to disk and renamed over the old
one, so an interruption never leaves a half-written file.  Loading uses
``torch.load(weights_only=True)``, which refuses arbitrary pickled code, and
checks a format marker so a foreign file gets a clear error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "pyro-vae-checkpoint"
VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt, truncated, or not written by "
            f"torch.save with plain tensors): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint (missing format marker {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')!r}; this pyro-vae reads version {VERSION}"
        )
    for key in ("program", "config", "input_dim"):
        if key not in state:
            raise CheckpointError(f"{path} lacks the {key!r} entry; it is incomplete")
    return state
