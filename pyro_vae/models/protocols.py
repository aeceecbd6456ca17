"""What a part is: protocols for priors, encoders and decoders, and the optional hooks.

A part is any ``torch.nn.Module`` whose ``forward`` returns a
``torch.distributions.Distribution`` with the batch as its batch shape:

* a **prior** ``p(z)``: ``forward(batch_size, y=None)``, batch shape ``(batch_size,)``;
* an **encoder** (the guide's network) ``q(z | x)``: ``forward(x, y=None)`` with
  ``x`` of shape ``(B, d)``, batch shape ``(B,)``;
* a **decoder** ``p(x | z)``: ``forward(z, y=None)`` with ``z`` of shape
  ``(..., B, *latent)``, batch shape ``(..., B)`` and event shape ``(d,)``: it
  broadcasts a leading vectorized particle dimension.

``y`` is the one-hot label of a conditional VAE, or ``None``.  Nothing else is
required; the library's own parts subclass no common base.  Optional hooks,
used where present:

* ``latent_dim`` (int): checked for agreement between the parts of a
  :class:`~pyro_vae.models.vae.VAE`;
* ``check_data(x, what)``: reject data outside the decoder's support
  (:func:`check_part_data` falls back to a finiteness check);
* ``mean(z, y=None)``: the decoder mean ``E[x | z]`` for pictures
  (:func:`part_mean` falls back to the distribution's ``mean``);
* ``set_progress(step, steps_per_epoch)``: called before every training step
  (e.g. a relaxation temperature schedule).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.distributions import Distribution

from pyro_vae.data.dataset import count_non_finite

#: Draws averaged by :func:`decoder_mean` for a distribution without a closed-form mean.
MEAN_SAMPLES = 16


class DataDomainError(ValueError):
    """Data lies outside the support of the chosen decoder likelihood."""


@runtime_checkable
class PriorPart(Protocol):
    """p(z): ``forward(batch_size, y=None)`` returns a distribution with batch shape ``(batch_size,)``."""

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> Distribution: ...


@runtime_checkable
class EncoderPart(Protocol):
    """q(z | x): ``forward(x, y=None)`` returns a distribution with batch shape ``x.shape[:-1]``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Distribution: ...


@runtime_checkable
class DecoderPart(Protocol):
    """p(x | z): ``forward(z, y=None)`` returns a distribution with batch shape ``z``'s leading
    (particle and batch) dimensions and event shape ``(d,)``."""

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> Distribution: ...


@runtime_checkable
class ChecksData(Protocol):
    """Optional decoder hook: raise :class:`DataDomainError` for data outside the likelihood's support."""

    def check_data(self, x: torch.Tensor, what: str = "data") -> None: ...


@runtime_checkable
class HasMean(Protocol):
    """Optional decoder hook: ``E[x | z]``, cheaper or more exact than the distribution's ``mean``."""

    def mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class GenerativeModel(Protocol):
    """What the trainer and evaluator run: a Pyro model/guide pair on a batch ``x`` (and labels ``y``)."""

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> object: ...

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> object: ...


def check_finite(x: torch.Tensor, what: str = "data") -> None:
    """Raise :class:`DataDomainError` if ``x`` has NaN or infinite values."""
    bad, _ = count_non_finite(x)
    if bad:
        raise DataDomainError(f"{what} has {bad} NaN or infinite values; the decoder needs finite inputs")


def check_part_data(part: object, x: torch.Tensor, what: str = "data") -> None:
    """Check ``x`` against ``part``: its own ``check_data`` where it has one, else finiteness only."""
    hook = getattr(part, "check_data", None)
    if callable(hook):
        hook(x, what)
    else:
        check_finite(x, what)


def decoder_mean(distribution: Distribution) -> torch.Tensor:
    """``E[x]`` under a decoder's distribution, flattened to ``(*batch_shape, d)``.

    Uses ``distribution.mean`` (``Independent`` passes its base's through;
    ``Bernoulli``'s is ``sigmoid(logits)``); a distribution without a closed-form
    mean (e.g. a transformed one) gets the average of :data:`MEAN_SAMPLES` draws.
    """
    try:
        mean = distribution.mean
    except NotImplementedError:
        mean = distribution.sample((MEAN_SAMPLES,)).to(torch.get_default_dtype()).mean(0)
    batch_shape = distribution.batch_shape
    return mean.expand(*batch_shape, *distribution.event_shape).reshape(*batch_shape, -1)


def part_mean(decoder: DecoderPart, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder mean ``E[x | z]``: the decoder's own ``mean(z, y)`` where it has one,
    else :func:`decoder_mean` of ``decoder(z, y)``."""
    hook = getattr(decoder, "mean", None)
    if callable(hook):
        return hook(z, y)
    return decoder_mean(decoder(z, y))
