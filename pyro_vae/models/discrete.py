"""Discrete latents: categorical codes trained through the Gumbel-Softmax / Concrete relaxation.

docs/derivations.md, Concrete / Gumbel-Softmax latents; (D28)-(D33): ``z`` is ``n`` independent
categorical variables with ``k`` categories each, one-hot encoded, so a latent
has event shape ``(n, k)``.  Training replaces every categorical by its
continuous relaxation at temperature ``tau`` (the Concrete distribution of
Maddison et al. 2017 = the Gumbel-Softmax of Jang et al. 2017,
``RelaxedOneHotCategorical``), whose draws ``softmax((logits + g) / tau)`` with
Gumbel noise ``g`` are reparameterized.  The straight-through variant (Jang et
al. 2017, Sec. 2.2) passes the hard one-hot forward and the relaxed gradient
backward.  ``tau`` anneals exponentially between steps (Jang et al. 2017,
Sec. 4.1): ``tau(t) = max(tau_min, tau_0 exp(-rate * t / steps_per_epoch))``.

In eval mode (``module.training == False``) prior and guide return the exact
discrete ``OneHotCategorical`` distributions, so validation and test bounds are
bounds of the discrete model, not of its relaxation.  They are built as
``OneHotCategoricalStraightThrough``: the same draws and log-probabilities as
``OneHotCategorical`` (the straight-through term adds exactly zero to a draw),
but marked reparameterized, so every objective (including the Renyi/IWAE
estimators, which refuse score-function sites) can evaluate them.

Cold relaxations underflow: at low ``tau`` a relaxed draw has exact zeros and
its log-density is ``nan`` (pyro issue #3304).  Draws are therefore clamped
away from 0 (``clamp_probs``) and the temperature is never below
:data:`MIN_TEMPERATURE`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions.utils import clamp_probs

from pyro_vae.models.config import MIN_TEMPERATURE
from pyro_vae.models.guides import Encoder, concat_condition
from pyro_vae.models.networks import encoder_network
from pyro_vae.models.priors import Prior
from pyro_vae.models.protocols import DecoderPart, check_part_data, part_mean


class ClampedRelaxedOneHotCategorical(dist.RelaxedOneHotCategorical):
    """``RelaxedOneHotCategorical`` whose draws are clamped to ``[eps, 1 - eps]`` so
    that their log-density stays finite at low temperatures (pyro issue #3304).
    Build it with ``validate_args=False``: a clamped draw is off the simplex by
    at most ``k * eps``."""

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return clamp_probs(super().rsample(sample_shape))


def relaxed_one_hot(logits: torch.Tensor, temperature: float, straight_through: bool = False
                    ) -> dist.TorchDistribution:
    """The Concrete / Gumbel-Softmax relaxation of ``OneHotCategorical(logits)`` at
    ``temperature`` (clamped to at least :data:`MIN_TEMPERATURE`); batch shape
    ``logits.shape[:-1]``, event shape ``logits.shape[-1:]``."""
    tau = logits.new_tensor(max(float(temperature), MIN_TEMPERATURE))
    if straight_through:  # Pyro's straight-through draw clamps its relaxed sample itself
        return dist.RelaxedOneHotCategoricalStraightThrough(tau, logits=logits, validate_args=False)
    return ClampedRelaxedOneHotCategorical(tau, logits=logits, validate_args=False)


def exact_one_hot(logits: torch.Tensor) -> dist.TorchDistribution:
    """The discrete ``OneHotCategorical(logits)``, as its straight-through subclass so that
    estimators that need reparameterized sites can evaluate it (its draws and
    log-probabilities are those of ``OneHotCategorical``)."""
    return dist.OneHotCategoricalStraightThrough(logits=logits)


@dataclass(frozen=True)
class TemperatureSchedule:
    """Exponential annealing ``tau(t) = max(minimum, initial * exp(-rate * epochs(t)))``
    (Jang et al. 2017, Sec. 4.1), with ``epochs(t) = step / steps_per_epoch``."""

    initial: float = 1.0
    minimum: float = 0.5
    rate: float = 0.1

    def __post_init__(self) -> None:
        if not self.minimum > 0 or not self.initial >= self.minimum or not self.rate >= 0:
            raise ValueError("temperature schedule needs 0 < minimum <= initial and rate >= 0; got "
                             f"initial={self.initial!r}, minimum={self.minimum!r}, rate={self.rate!r}")
        if self.minimum < MIN_TEMPERATURE:
            warnings.warn(f"temperature minimum {self.minimum} is below {MIN_TEMPERATURE}; it is clamped "
                          "there (relaxed draws underflow at colder temperatures, pyro issue #3304)",
                          stacklevel=2)

    def at(self, step: int, steps_per_epoch: int) -> float:
        """Temperature before training step ``step`` (0-based)."""
        epochs = step / max(1, steps_per_epoch)
        return max(self.minimum, MIN_TEMPERATURE, self.initial * math.exp(-self.rate * epochs))


class _Relaxed:
    """Temperature state shared by the relaxed prior and guide: ``set_progress``
    is the hook the trainer calls before each step."""

    schedule: TemperatureSchedule
    temperature: float
    straight_through: bool
    training: bool

    def _init_latents(self, num_latents: int, num_categories: int, schedule: TemperatureSchedule,
                      straight_through: bool) -> None:
        if num_latents < 1 or num_categories < 2:
            raise ValueError(f"need num_latents >= 1 and num_categories >= 2, got {num_latents!r} "
                             f"and {num_categories!r}")
        self.num_latents = num_latents
        self.num_categories = num_categories
        self.latent_dim = num_latents * num_categories
        self.schedule = schedule
        self.temperature = schedule.at(0, 1)
        self.straight_through = straight_through

    def set_progress(self, step: int, steps_per_epoch: int) -> None:
        self.temperature = self.schedule.at(step, steps_per_epoch)

    def latent_distribution(self, logits: torch.Tensor) -> dist.TorchDistribution:
        """Relaxed while training, exact discrete in eval mode; event shape ``(n, k)``."""
        if self.training:
            return relaxed_one_hot(logits, self.temperature, self.straight_through).to_event(1)
        return exact_one_hot(logits).to_event(1)


class RelaxedCategoricalPrior(_Relaxed, Prior):
    """p(z) = prod_i Cat(z_i; uniform over k), relaxed to Concrete(uniform, tau) while
    training (Maddison et al. 2017, Eq. (15); Jang et al. 2017, Eq. (2))."""

    def __init__(self, num_latents: int, num_categories: int,
                 schedule: TemperatureSchedule = TemperatureSchedule(), straight_through: bool = False) -> None:
        super().__init__()
        self._init_latents(num_latents, num_categories, schedule, straight_through)
        self.register_buffer("logits", torch.zeros(num_latents, num_categories))

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        logits = self.logits.expand(batch_size, self.num_latents, self.num_categories)
        return self.latent_distribution(logits)


class RelaxedCategoricalEncoder(_Relaxed, Encoder):
    """q(z | x) = prod_i Cat(z_i; softmax(f_i(x))), relaxed to Concrete(f_i(x), tau) while
    training (Jang et al. 2017, Eq. (1)-(2)); the network emits ``n * k`` logits."""

    def __init__(self, input_dim: int, num_latents: int, num_categories: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0,
                 schedule: TemperatureSchedule = TemperatureSchedule(), straight_through: bool = False,
                 network: str = "mlp", image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self._init_latents(num_latents, num_categories, schedule, straight_through)
        self.net = encoder_network(input_dim, condition_dim, hidden, self.latent_dim, activation, network,
                                   image_shape)

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape ``(..., n, k)``."""
        out = self.net(concat_condition(x, y))
        return out.reshape(*out.shape[:-1], self.num_latents, self.num_categories)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        return self.latent_distribution(self.logits(x, y))


class CategoricalLatentDecoder(nn.Module):
    """Adapts any decoder to categorical latents: flattens ``z`` of shape
    ``(..., B, n, k)`` to the ``n * k`` one-hot features the wrapped decoder reads."""

    def __init__(self, decoder: DecoderPart, num_latents: int, num_categories: int) -> None:
        super().__init__()
        self.latent_dim = num_latents * num_categories
        wrapped = getattr(decoder, "latent_dim", self.latent_dim)
        if wrapped != self.latent_dim:
            raise ValueError(f"the wrapped decoder reads {wrapped} latent features, expected "
                             f"num_latents * num_categories = {self.latent_dim}")
        self.decoder = decoder
        if hasattr(decoder, "output_dim"):
            self.output_dim = decoder.output_dim

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(*z.shape[:-2], self.latent_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        return self.decoder(self._flat(z), y)

    def mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return part_mean(self.decoder, self._flat(z), y)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        check_part_data(self.decoder, x, what)

    def set_progress(self, step: int, steps_per_epoch: int) -> None:
        hook = getattr(self.decoder, "set_progress", None)
        if hook is not None:
            hook(step, steps_per_epoch)
