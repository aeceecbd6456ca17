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

from .discrete import MIN_TEMPERATURE


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
    # model: options of particular parts (see docs/parts.md)
    mixture_components: int = 10  # --prior mixture: number of Gaussian components
    pseudo_inputs: int = 100  # --prior vamp: number of learnable pseudo-inputs K
    flow_steps: int = 2  # --prior flow / --guide iaf: number of autoregressive steps
    flow_hidden: int = 128  # hidden units of each autoregressive network (and the IAF context size)
    guide_rank: int = 2  # --guide lowrank: rank of the covariance factor
    num_categories: int = 10  # --prior/--guide categorical: categories per latent (latent_dim = number of latents)
    temperature: float = 1.0  # Gumbel-Softmax temperature at the first step
    temperature_min: float = 0.5  # the temperature never anneals below this
    temperature_anneal: float = 0.1  # exponential decay rate of the temperature per epoch
    straight_through: bool = False  # hard one-hot samples forward, relaxed gradients backward
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
        self._validate_part_options()
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def _validate_part_options(self) -> None:
        """Ranges of the options of particular parts (priors, guides, discrete latents)."""
        counts = {"mixture_components": self.mixture_components, "pseudo_inputs": self.pseudo_inputs,
                  "flow_steps": self.flow_steps, "flow_hidden": self.flow_hidden,
                  "guide_rank": self.guide_rank}
        for name, value in counts.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.guide == "lowrank" and self.guide_rank > self.latent_dim:
            raise ValueError(f"guide_rank must be at most latent_dim={self.latent_dim}, got {self.guide_rank!r} "
                             "(use --guide full for a full covariance)")
        if (self.prior == "flow" or self.guide == "iaf") and self.flow_hidden < self.latent_dim:
            raise ValueError(f"flow_hidden must be at least latent_dim={self.latent_dim} (an autoregressive "
                             f"network needs as many hidden units as inputs), got {self.flow_hidden!r}")
        if not isinstance(self.num_categories, int) or self.num_categories < 2:
            raise ValueError(f"num_categories must be an integer >= 2, got {self.num_categories!r}")
        if not self.temperature_min >= MIN_TEMPERATURE:
            raise ValueError(f"temperature_min must be >= {MIN_TEMPERATURE}: colder relaxed samples underflow "
                             "to exact one-hots (pyro issue #3304) and their gradients explode; "
                             f"got {self.temperature_min!r}")
        if not self.temperature >= self.temperature_min:
            raise ValueError(f"temperature must be >= temperature_min={self.temperature_min}, "
                             f"got {self.temperature!r}")
        if not self.temperature_anneal >= 0:
            raise ValueError(f"temperature_anneal must be >= 0 (0 keeps the temperature fixed), "
                             f"got {self.temperature_anneal!r}")


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
