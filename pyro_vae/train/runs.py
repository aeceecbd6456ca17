"""Reopen a trained run from its directory: config, program, parameters and data.

The run's config says how its program was built (the built-in model of
``config.model``, or ``config.program``, an import path); it is built again
and the checkpoint's parameters are copied into it.  A program that was handed
to the trainer as Python objects, with no import path, is passed back in as
``program`` (e.g. ``load_run(run_dir, program=(model, guide))``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_vae.data import Dataset, load_dataset
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.integrity import check_data_fingerprint
from pyro_vae.train.program import (Program, ProgramError, as_program, build_program, fresh_program_parameters,
                                    restore_program_state)
from pyro_vae.train.trainer import BEST, CHECKPOINT, batch_args, resolve_device


@dataclass
class Run:
    """A trained program with its config and checkpoint."""

    run_dir: Path
    config: TrainConfig
    program: Program
    state: dict[str, Any]
    device: torch.device
    checkpoint_path: Path | None = None  # the checkpoint file the program was restored from

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        return tuple(self.state.get("image_shape") or ()) or None

    @property
    def module(self):
        """The ``nn.Module`` owning the program (the built-in models), else ``None``."""
        return self.program.module

    def load_data(self, data_dir: str | None = None, allow_changed_data: bool = False) -> Dataset:
        """The run's data set, checked against the checkpoint's feature size and the fingerprint of
        the data the run was trained on: changed data is a
        :class:`~pyro_vae.train.integrity.DataChangedError`, or with ``allow_changed_data`` a
        :class:`~pyro_vae.train.integrity.DataChangedWarning`."""
        dataset = load_dataset(self.config.data, data_dir or self.config.data_dir)
        check_features(self.state, dataset.num_features, dataset.name)
        check_data_fingerprint(self.state.get("data_fingerprint"), dataset, f"the run in {self.run_dir}",
                               allow_changed=allow_changed_data)
        return dataset

    def args(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The program's arguments for inputs ``x`` (and labels ``y`` if the run is conditional)."""
        return batch_args(x, y if self.config.model.conditional else None)


def check_features(state: dict[str, Any], num_features: int, what: str) -> None:
    if state["input_dim"] != num_features:
        raise CheckpointError(
            f"the checkpoint expects {state['input_dim']} features per data point but {what} has {num_features}"
        )


def load_run(run_dir: str | Path, device: str = "auto", which: str = "best", program: Any = None) -> Run:
    """Reopen ``run_dir`` from ``best.pt`` (or ``checkpoint.pt`` with ``which='last'``).

    ``program`` replaces the rebuilt program, for runs of a model/guide pair
    that was handed to the trainer as Python objects.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a run directory (it is a file)")
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    names = [BEST, CHECKPOINT] if which == "best" else [CHECKPOINT]
    # the first that is there at all: a best.pt that is damaged into a folder or a dangling link is
    # named (by load_checkpoint), not silently passed over for the last checkpoint
    path = next((run_dir / n for n in names if (run_dir / n).exists() or (run_dir / n).is_symlink()), None)
    if path is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint ({' or '.join(names)}); is it a pyro-vae run "
                              "directory, and has its training saved a first checkpoint?")
    dev = resolve_device(device)
    state = load_checkpoint(path, map_location=dev)
    try:
        config = TrainConfig.from_dict(state["config"])
    except ValueError as e:
        raise CheckpointError(f"{path} holds a config this pyro-vae cannot read: {e}") from None
    if program is not None:
        prog = as_program(program)
    elif not state.get("built_in", True):
        raise CheckpointError(f"{run_dir} was trained from a model/guide pair given as Python objects; "
                              "pass the same pair: load_run(run_dir, program=(model, guide))")
    else:
        prog = build_program(config, state["input_dim"], state.get("num_classes") or None,
                             tuple(state.get("image_shape") or ()) or None)
    prog.to(dev)
    probe = torch.zeros(2, state["input_dim"], device=dev)
    labels = torch.zeros(2, dtype=torch.long, device=dev) if config.model.conditional else None
    try:
        params = fresh_program_parameters(prog, *batch_args(probe, labels))
        restore_program_state(prog, params, state["program"])
    except ProgramError as e:
        raise CheckpointError(f"{path} does not match the program its config describes: {e}") from None
    prog.train(False)
    return Run(run_dir, config, prog, state, dev, path)
