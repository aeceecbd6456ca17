"""Atomic, verified checkpoints.

A checkpoint is a plain dict of tensors and primitive values, written to a
temporary file in the same folder, flushed to disk and renamed over the old
one, so an interruption never leaves a half-written file (a temporary file
left by a killed process is removed when the run next starts).  It carries a
checksum of its contents (:func:`~pyro_vae.train.integrity.state_digest`),
verified on load, so a corrupted file is refused by name instead of loaded.
Loading uses ``torch.load(weights_only=True)``, which refuses arbitrary
pickled code, and checks a format marker so a foreign file gets a clear error.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pyro_vae.data.paths import new_file_mode
from pyro_vae.train.integrity import ALGORITHM, state_digest

FORMAT = "pyro-vae-checkpoint"
VERSION = 3
#: Versions this code reads; version 2 has no checksum and is read without one.
READABLE_VERSIONS = (2, 3)
#: Keys of the envelope, not of the state the checksum covers.
ENVELOPE = ("format", "version", "checksum")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with its checksum to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in state.items() if k not in ENVELOPE}
    checksum = {"algorithm": ALGORITHM, "digest": state_digest(state)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, "checksum": checksum, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch reports a full disk as a RuntimeError
            free = shutil.disk_usage(path.parent).free
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise CheckpointWriteError(e.errno if isinstance(e, OSError) else None,
                                       f"could not write the checkpoint ({reason}; {free // 2**20} MB free on that "
                                       "disk); the previous checkpoint, if any, is intact", str(path)) from e
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its format and checksum."""
    path = Path(path)
    if not path.is_file():
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist")
        if path.exists():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise CheckpointError(f"{path} is {kind}, not a checkpoint file")
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
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')!r}; this pyro-vae reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if state["version"] >= 3:
        verify_checksum(state, path)
    for key in ("program", "config", "input_dim"):
        if key not in state:
            raise CheckpointError(f"{path} lacks the {key!r} entry; it is incomplete")
    check_entries(state, path)
    return state


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_entries(state: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose entries the commands read are of the wrong kind (a file another
    program wrote in this format, or a version that stored them otherwise), naming the entry,
    instead of failing later deep inside a picture or a resumed step."""
    def bad(key: str, expected: str) -> CheckpointError:
        value = state.get(key)
        shown = f"{value!r}"[:80]
        return CheckpointError(f"{path} has an invalid {key!r} entry: {shown} ({type(value).__name__}); expected "
                               f"{expected}; it was not written by this pyro-vae")

    if not _count(state["input_dim"], 1):
        raise bad("input_dim", "a positive integer, the features per data point")
    if not _count(state.get("num_classes", 0) or 0, 0):
        raise bad("num_classes", "an integer >= 0")
    shape = state.get("image_shape") or []
    if not (isinstance(shape, (list, tuple)) and all(_count(s, 1) for s in shape)
            and (not shape or math.prod(shape) == state["input_dim"])):
        raise bad("image_shape", f"a list of positive sizes whose product is input_dim={state['input_dim']}, or []")
    if not isinstance(state["config"], dict):
        raise bad("config", "a table of options")
    program = state["program"]
    if not (isinstance(program, dict) and isinstance(program.get("params"), dict)
            and all(isinstance(v, torch.Tensor) for v in program["params"].values())
            and isinstance(program.get("buffers", {}), dict)):
        raise bad("program", "a table with the program's parameters by name ('params') and its buffers")
    for key in ("epoch", "batch", "step"):
        if key in state and not _count(state[key], 0):
            raise bad(key, "an integer >= 0")
    for key in ("built_in", "stopped_early"):
        if key in state and not isinstance(state[key], bool):
            raise bad(key, "true or false")
    if not isinstance(state.get("data_fingerprint") or {}, dict):
        raise bad("data_fingerprint", "a table of digests by split")


def verify_checksum(state: dict[str, Any], path: str | Path) -> None:
    """Recompute the checksum of a loaded checkpoint; a mismatch is a :class:`CheckpointError`."""
    checksum = state.get("checksum")
    if not isinstance(checksum, dict) or checksum.get("algorithm") != ALGORITHM or "digest" not in checksum:
        raise CheckpointError(f"{path} has no valid checksum entry (expected {ALGORITHM}); it is corrupt or "
                              "was not written by pyro-vae")
    digest = state_digest({k: v for k, v in state.items() if k not in ENVELOPE})
    if digest != checksum["digest"]:
        raise CheckpointError(
            f"{path} is corrupt: the {ALGORITHM} checksum of its contents is {digest[:16]}..., but the file "
            f"records {str(checksum['digest'])[:16]}...; it was changed after it was written (disk or copy "
            "error?). Restore it from a copy, or use the run's other checkpoint (best.pt / checkpoint.pt)"
        )
