"""Reopen a trained run from its directory: config, model and data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_vae.data import Dataset, load_dataset
from pyro_vae.models.registry import build_vae
from pyro_vae.models.vae import VAE
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.trainer import BEST, CHECKPOINT, resolve_device


@dataclass
class Run:
    run_dir: Path
    config: TrainConfig
    vae: VAE
    state: dict[str, Any]

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        return tuple(self.state.get("image_shape") or ()) or None

    def load_data(self, data_dir: str | None = None) -> Dataset:
        """The run's data set, checked against the checkpoint's feature size."""
        dataset = load_dataset(self.config.data, data_dir or self.config.data_dir)
        check_features(self.state, dataset.num_features, dataset.name)
        return dataset


def check_features(state: dict[str, Any], num_features: int, what: str) -> None:
    if state["input_dim"] != num_features:
        raise CheckpointError(
            f"the checkpoint expects {state['input_dim']} features per data point but {what} has {num_features}"
        )


def load_run(run_dir: str | Path, device: str = "auto", which: str = "best") -> Run:
    """Rebuild the VAE of ``run_dir`` from ``best.pt`` (or ``checkpoint.pt`` with ``which='last'``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    names = [BEST, CHECKPOINT] if which == "best" else [CHECKPOINT]
    path = next((run_dir / n for n in names if (run_dir / n).is_file()), run_dir / names[-1])
    dev = resolve_device(device)
    state = load_checkpoint(path, map_location=dev)
    config = TrainConfig.from_dict(state["config"])
    vae = build_vae(config.model, state["input_dim"], state.get("num_classes") or None).to(dev)
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model its config describes: {e}") from None
    vae.eval()
    return Run(run_dir, config, vae, state)


def run_device(run: Run) -> torch.device:
    return next(iter(run.vae.buffers()), next(run.vae.parameters())).device
