"""Training configuration: one dataclass, filled from defaults, a TOML file and flags.

Precedence is defaults < TOML file < command-line flags.  The resolved config
is stored in every checkpoint, so a run can be rebuilt from its directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # data
    data: str = "digits"
    data_dir: str | None = None
    # model: parts by name (see pyro_vae.parts)
    prior: str = "normal"
    guide: str = "diagonal"
    decoder: str = "bernoulli"
    latent_dim: int = 20
    hidden: list[int] = field(default_factory=lambda: [400])
    activation: str = "relu"
    sigma_x: float = 0.1
    conditional: bool = False
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(known))}"
            )
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        """Check ranges that would otherwise fail deep inside training."""
        positive = {"latent_dim": self.latent_dim, "epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0 disables early stopping), got {self.patience!r}")
        if any((not isinstance(h, int)) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {self.hidden!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: keys at top level or under a ``[train]`` table."""
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
