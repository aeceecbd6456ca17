"""What the model is: parts by name (or import path), sizes and part options.

Kept apart from :class:`~pyro_vae.train.config.TrainConfig` (objective,
optimisation, data, output), so the same model description builds the model
for training, evaluation and sampling.  Part names are looked up in
:mod:`pyro_vae.models.registry`; a name with a colon (``package.module:Name``)
is an import path to a user's part.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pyro_vae.models.networks import NETWORKS

#: (prior, guide) pairs that are refused: why, and what to use instead.
REFUSED_PAIRS: dict[tuple[str, str], str] = {
    ("vamp", "iaf"): (
        "--prior vamp with --guide iaf is refused: the VampPrior's density at a code z is the mean of the "
        "guide's densities q(z | u_k) over the pseudo-inputs u_k, and an IAF's density at a code it did not "
        "draw needs latent_dim sequential inversions of each of its autoregressive networks, for every data "
        "point x pseudo-input x particle -- hundreds of times the step time of the diagonal guide, and the "
        "inverse has no faster exact form; use --prior vamp --guide diagonal (or lowrank, full) for the "
        "VampPrior, or --prior flow --guide iaf for a flexible prior with the IAF guide"
    ),
}

#: Coldest Gumbel-Softmax temperature: colder relaxed samples underflow to exact one-hots
#: (pyro issue #3304) and their gradients explode.
MIN_TEMPERATURE = 0.1


@dataclass
class ModelConfig:
    """What the built-in model is: its prior, guide and decoder by name (or import path), their
    sizes and options, and the architecture (networks, one or two stochastic layers).  The same
    description rebuilds the model for training, evaluation and sampling."""

    # parts by name (see pyro_vae.models.registry) or import path "package.module:Name"
    prior: str = "normal"
    guide: str = "diagonal"
    decoder: str = "bernoulli"
    latent_dim: int = 20
    hidden: list[int] = field(default_factory=lambda: [400])
    activation: str = "relu"
    sigma_x: float = 0.1
    conditional: bool = False
    # options of particular parts (see docs/parts.md)
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
    # architecture
    stochastic_layers: int = 1  # 1: z ~ p(z); 2: z2 ~ p(z2), z1 ~ p(z1 | z2) (Burda et al. 2016)
    top_latent_dim: int = 50  # --stochastic-layers 2: size of z2 (latent_dim is z1's size)
    top_hidden: list[int] = field(default_factory=lambda: [100, 100])  # hidden sizes of the z1 <-> z2 networks
    network: str = "mlp"  # "mlp", or "conv": convolutional guide and decoder networks for image data

    @property
    def prior_latent_dim(self) -> int:
        """Size of the latent the prior is on: ``latent_dim``, or ``top_latent_dim`` (z2) with two layers."""
        return self.top_latent_dim if self.stochastic_layers == 2 else self.latent_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build and validate, rejecting unknown keys with the list of valid ones."""
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid ones are "
                             f"{', '.join(sorted(cls.field_names()))}")
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        """Check ranges that would otherwise fail deep inside model construction."""
        counts = {"latent_dim": self.latent_dim, "mixture_components": self.mixture_components,
                  "pseudo_inputs": self.pseudo_inputs, "flow_steps": self.flow_steps,
                  "flow_hidden": self.flow_hidden, "guide_rank": self.guide_rank,
                  "top_latent_dim": self.top_latent_dim}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("hidden", "top_hidden"):
            sizes = getattr(self, name)
            if not isinstance(sizes, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                                  for h in sizes):
                raise ValueError(f"{name} sizes must be a list of positive integers, got {sizes!r}")
        for name in ("prior", "guide", "decoder", "activation", "network"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a name, got {getattr(self, name)!r}")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.stochastic_layers not in (1, 2) or isinstance(self.stochastic_layers, bool):
            raise ValueError(f"stochastic_layers must be 1 or 2, got {self.stochastic_layers!r}")
        if self.stochastic_layers == 2:
            self._validate_two_layers()
        check_pair(self.prior, self.guide)
        if not (isinstance(self.sigma_x, (int, float)) and math.isfinite(self.sigma_x) and self.sigma_x > 0):
            raise ValueError(f"sigma_x must be a positive finite number, got {self.sigma_x!r}")
        if self.guide == "lowrank" and self.guide_rank > self.latent_dim:
            raise ValueError(f"guide_rank must be at most latent_dim={self.latent_dim}, got {self.guide_rank!r} "
                             "(use --guide full for a full covariance)")
        flows = {"latent_dim": self.latent_dim} if self.guide == "iaf" else {}
        if self.prior == "flow":  # with two stochastic layers the prior is on z2
            flows["top_latent_dim" if self.stochastic_layers == 2 else "latent_dim"] = self.prior_latent_dim
        for name, size in flows.items():
            if self.flow_hidden < size:
                raise ValueError(f"flow_hidden must be at least {name}={size} (an autoregressive network "
                                 f"needs as many hidden units as inputs), got {self.flow_hidden!r}")
        if isinstance(self.num_categories, bool) or not isinstance(self.num_categories, int) \
                or self.num_categories < 2:
            raise ValueError(f"num_categories must be an integer >= 2, got {self.num_categories!r}")
        for name in ("temperature", "temperature_min", "temperature_anneal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
        for name in ("conditional", "straight_through"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _validate_two_layers(self) -> None:
        """Two stochastic layers put the prior on z2 and the guide on z1 (q(z2 | z1) is a
        diagonal Gaussian); the parts that need one latent seen by both refuse."""
        refused = {
            ("prior", "vamp"): "the VampPrior is a mixture of the guide at pseudo-inputs, but the guide's "
                               "first layer is q(z1 | x), not a distribution over z2",
            ("prior", "categorical"): "the categorical prior and guide describe one discrete latent z",
            ("guide", "categorical"): "the categorical prior and guide describe one discrete latent z",
        }
        for option in ("prior", "guide"):
            reason = refused.get((option, getattr(self, option)))
            if reason:
                raise ValueError(f"--{option} {getattr(self, option)} does not work with --stochastic-layers 2: "
                                 f"{reason}; use --stochastic-layers 1, or another --{option}")


def check_pair(prior: str, guide: str) -> None:
    """Raise ``ValueError`` with the reason and the alternatives for a pair in :data:`REFUSED_PAIRS`."""
    reason = REFUSED_PAIRS.get((prior, guide))
    if reason is not None:
        raise ValueError(reason)
