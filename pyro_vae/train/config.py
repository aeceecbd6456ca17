"""How to train: data, objective, optimisation and output, plus the :class:`ModelConfig` trained.

Precedence is defaults < TOML file < command-line flags.  Flags and TOML keys
are flat (``latent_dim``, ``lr``); :meth:`TrainConfig.from_flat` sends each to
the model or the training side by name.  The resolved config is stored in
every checkpoint, so a run can be rebuilt from its directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pyro_vae.models.config import ModelConfig


@dataclass
class TrainConfig:
    # data
    data: str = "digits"
    data_dir: str | None = None
    # objective
    objective: str = "trace"
    particles: int | None = None
    alpha: float | None = None
    beta: float = 1.0
    warmup_epochs: float = 0.0
    # optimisation
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    # output
    run_dir: str | None = None
    progress: bool = True
    # a user's model/guide program by import path (see pyro_vae.train.program); None: the built-in model
    program: str | None = None
    # the built-in model (parts, sizes); a program's factory also receives it
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"model"}

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        return values

    def to_flat(self) -> dict[str, Any]:
        """Training and model options in one dict, keyed as the flags are."""
        values = self.to_dict()
        return {**values.pop("model"), **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from :meth:`to_dict`'s form (a nested ``model``) or the flat form of the flags."""
        values = dict(values)
        model = values.pop("model", None)
        if isinstance(model, ModelConfig):
            model = model.to_dict()
        flat = {**(model or {}), **values}
        return cls.from_flat(flat)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "TrainConfig":
        """Split flat options into model and training options, rejecting unknown keys by name."""
        train_keys, model_keys = cls.field_names(), ModelConfig.field_names()
        unknown = sorted(set(values) - train_keys - model_keys)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys are "
                             f"{', '.join(sorted(train_keys | model_keys))}")
        model = ModelConfig.from_dict({k: v for k, v in values.items() if k in model_keys})
        config = cls(model=model, **{k: v for k, v in values.items() if k in train_keys})
        config.validate()
        return config

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with flat options changed (model options included)."""
        return TrainConfig.from_flat({**self.to_flat(), **changes})

    def validate(self) -> None:
        """Check ranges that would otherwise fail deep inside training."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0 disables early stopping), got {self.patience!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        self.model.validate()


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: flat keys at top level or under a ``[train]`` table."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    if "train" in values and isinstance(values["train"], dict):
        values = {**{k: v for k, v in values.items() if k != "train"}, **values["train"]}
    return {k.replace("-", "_"): v for k, v in values.items()}
