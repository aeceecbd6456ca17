"""Decoders p(x | z): the likelihoods of docs/derivations.md, Reconstruction terms; (D17)-(D22).

A decoder's ``forward(z, y=None)`` maps latents of shape ``(..., B, r)`` to a
distribution with batch shape ``(..., B)`` and event shape ``(d,)``; the leading
``...`` is a vectorized particle dimension when there is one (the
:class:`~pyro_vae.models.protocols.DecoderPart` protocol).  ``check_data``
rejects data outside the likelihood's support before training starts.

The decoders here share :class:`Decoder`, which holds the network (an MLP, or a
transposed-convolution net for image data with ``network="conv"``); a user's
decoder need not subclass it.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.models.guides import concat_condition
from pyro_vae.models.networks import decoder_network
from pyro_vae.models.protocols import DataDomainError, check_finite, decoder_mean


class Decoder(nn.Module):
    """Shared implementation of the library's decoders: the network ``f`` from
    ``(z, y)`` to the likelihood's parameters, ``features(z, y) = f([z, y])``.

    ``network="conv"`` makes ``f`` a transposed-convolution net producing
    ``image_shape`` (:class:`~pyro_vae.models.networks.ConvDecoderNet`).
    """

    def __init__(self, latent_dim: int, output_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0, network: str = "mlp",
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.output_dim = output_dim
        self.net = decoder_network(latent_dim + condition_dim, hidden, output_dim, activation, network,
                                   image_shape)

    def features(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.net(concat_condition(z, y))

    def mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z], used for pictures of samples and reconstructions."""
        return decoder_mean(self(z, y))

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise :class:`DataDomainError` if ``x`` is not finite."""
        check_finite(x, what)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError


def check_unit_interval(x: torch.Tensor, what: str, needed_by: str) -> None:
    """Raise :class:`DataDomainError` unless every value of ``x`` is finite and in [0, 1]: one pass
    over the data (NaN and infinities show in the minimum and maximum), a second only to count
    the non-finite values of data that has some."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(x, what)
    if lo < 0.0 or hi > 1.0:
        raise DataDomainError(f"{what} has values in [{lo:g}, {hi:g}]; {needed_by} needs values in [0, 1] "
                              "(rescale the data, or use --decoder gaussian)")


class BernoulliDecoder(Decoder):
    """p(x | z) = prod_j Bernoulli(x_j; sigmoid(f(z))_j), parameterized by logits
    so that ``log p`` is the numerically stable ``-BCEWithLogits``."""

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        # Support is checked once on the whole data set (check_data), not per step;
        # grayscale targets in [0, 1] are then allowed, as in Pyro's own VAE example.
        return dist.Bernoulli(logits=self.features(z, y), validate_args=False).to_event(1)

    def mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.features(z, y))

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        check_unit_interval(x, what, "the Bernoulli decoder")


class GaussianDecoder(Decoder):
    """p(x | z) = N(x; mu(z), sigma_x^2 I) (docs/derivations.md (D17)), with ``sigma_x`` fixed or learned.

    With ``learn_sigma=True`` a single scalar ``log sigma_x`` is a parameter,
    initialised at ``log(sigma)``.
    """

    def __init__(self, latent_dim: int, output_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0, sigma: float = 1.0,
                 learn_sigma: bool = False, network: str = "mlp", image_shape: Sequence[int] | None = None) -> None:
        super().__init__(latent_dim, output_dim, hidden, activation, condition_dim, network=network,
                         image_shape=image_shape)
        if not sigma > 0:
            raise ValueError(f"sigma_x must be positive, got {sigma!r}")
        log_sigma = torch.tensor(math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        loc = self.features(z, y)
        return dist.Normal(loc, self.sigma.expand_as(loc), validate_args=False).to_event(1)

    def mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.features(z, y)


class PixelScaleGaussianDecoder(GaussianDecoder):
    """p(x | z) = N(x; mu(z), diag(sigma_1^2, ..., sigma_d^2)) with one learned
    ``log sigma_j`` per pixel, shared by all ``z`` ((D17) with a heteroscedastic
    but input-independent scale), initialised at ``log(sigma)``.  Learning the
    scale lets the likelihood find its own noise level per pixel instead of the
    fixed ``sigma_x`` that sets the reconstruction/KL balance by hand."""

    def __init__(self, latent_dim: int, output_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0, sigma: float = 1.0, network: str = "mlp",
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__(latent_dim, output_dim, hidden, activation, condition_dim, sigma=sigma, learn_sigma=True,
                         network=network, image_shape=image_shape)
        self.log_sigma = nn.Parameter(torch.full((output_dim,), math.log(sigma)))


class ContinuousBernoulliDecoder(Decoder):
    """p(x | z) = prod_j CB(x_j; lambda_j(z)) for x in [0, 1]: the continuous Bernoulli of
    Loaiza-Ganem & Cunningham 2019, ``CB(x; lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x)``
    with the normalizer ``C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda)`` (2 at
    lambda = 1/2) that the Bernoulli likelihood misses on grayscale data.

    ``mean`` is ``E[x | z]`` under the CB, which differs from ``lambda``.
    """

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=self.features(z, y), validate_args=False).to_event(1)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        check_unit_interval(x, what, "the continuous Bernoulli decoder")
