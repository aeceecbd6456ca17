"""Amortized guides q(z | x): encoders that return a Pyro distribution.

An encoder's ``forward(x, y=None)`` maps a batch ``x`` of shape ``(B, d)`` (and
an optional one-hot label ``y`` of shape ``(B, c)``) to a distribution with
batch shape ``(B,)`` and event shape ``(r,)`` (the
:class:`~pyro_vae.models.protocols.EncoderPart` protocol).  Every encoder here
takes ``network="conv"`` and an ``image_shape`` to read images through two
strided convolutions instead of an MLP.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.models.networks import encoder_network, output_layer


def zero_output_rows(net: nn.Module, start: int) -> None:
    """Zero the weights and biases of the last layer's outputs ``start:``, so that a guide
    with extra covariance outputs starts as the diagonal guide (the reparameterized
    draw still gives those outputs gradients)."""
    last = output_layer(net)
    with torch.no_grad():
        last.weight[start:].zero_()
        last.bias[start:].zero_()


def concat_condition(inputs: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Append the conditioning vector ``y`` to ``inputs``, broadcasting leading (particle) dims."""
    if y is None:
        return inputs
    y = y.to(inputs.dtype).expand(*inputs.shape[:-1], y.shape[-1])
    return torch.cat([inputs, y], dim=-1)


class Encoder(nn.Module):
    """Optional base of an encoder with a ``latent_dim``: ``forward(x, y=None) -> Distribution``
    over ``z``.  Any ``nn.Module`` with that ``forward`` is an encoder."""

    latent_dim: int

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError


class DiagonalGaussianEncoder(Encoder):
    """q(z | x) = N(mu(x), diag(sigma^2(x))) with an MLP that outputs ``mu`` and
    the log-variance ``l = log sigma^2`` (docs/derivations.md (D3)); ``sigma = exp(l / 2)`` so a
    draw is the reparameterized ``z = mu + sigma * eps`` of (D13)."""

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0, network: str = "mlp",
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = encoder_network(input_dim, condition_dim, hidden, 2 * latent_dim, activation, network,
                                   image_shape)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, log_var)``, each of shape ``(..., r)``."""
        loc, log_var = self.net(concat_condition(x, y)).chunk(2, dim=-1)
        return loc, log_var

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        loc, log_var = self.encode(x, y)
        return dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)


class LowRankGaussianEncoder(Encoder):
    """q(z | x) = N(mu(x), W(x) W(x)^T + diag(d(x))) with a rank-``rank`` factor ``W``:
    a correlated Gaussian guide at O(r * rank) cost (the rank-one-plus-diagonal
    covariance of Rezende et al. 2014, to any rank; ``LowRankMultivariateNormal``).

    Draws are reparameterized, ``z = mu + W eps_1 + sqrt(d) * eps_2`` ((D13)
    of docs/derivations.md with a correlated scale).  ``d = exp(l)`` where ``l`` plays the role of the
    diagonal encoder's log-variance, so with ``W = 0`` it is the diagonal guide; it
    starts there (``W`` initialised to zero).
    """

    def __init__(self, input_dim: int, latent_dim: int, rank: int = 2, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0, network: str = "mlp",
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= latent_dim:
            raise ValueError(f"rank must be between 1 and latent_dim={latent_dim}, got {rank!r}")
        self.latent_dim = latent_dim
        self.rank = rank
        self.net = encoder_network(input_dim, condition_dim, hidden, (2 + rank) * latent_dim, activation, network,
                                   image_shape)
        zero_output_rows(self.net, 2 * latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        out = self.net(concat_condition(x, y))
        r = self.latent_dim
        loc, log_diag, factor = out[..., :r], out[..., r:2 * r], out[..., 2 * r:]
        cov_factor = factor.reshape(*factor.shape[:-1], r, self.rank)
        return dist.LowRankMultivariateNormal(loc, cov_factor, log_diag.exp())


class FullCovarianceEncoder(Encoder):
    """q(z | x) = N(mu(x), L(x) L(x)^T) with a full lower-triangular Cholesky
    factor ``L`` (the full-covariance Gaussian posterior of Kingma & Welling 2019,
    "An Introduction to Variational Autoencoders"): ``z = mu + L eps``, (D13) of
    docs/derivations.md with a correlated scale.

    The network emits ``mu``, a log-variance ``l`` for the diagonal of ``L``
    (``L_ii = exp(l_i / 2)``, as in the diagonal guide) and the ``r(r-1)/2``
    entries below the diagonal, which start at zero: training starts from the
    diagonal guide.
    """

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0, network: str = "mlp",
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        # positions of the strictly lower entries in the row-major flattened r x r matrix
        self.register_buffer("below_index", rows * latent_dim + cols, persistent=False)
        self.net = encoder_network(input_dim, condition_dim, hidden, 2 * latent_dim + rows.numel(), activation,
                                   network, image_shape)
        zero_output_rows(self.net, 2 * latent_dim)

    def scale_tril(self, log_var: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        """Assemble ``L`` of shape ``(..., r, r)`` from its log-variance diagonal and strict lower part."""
        r = self.latent_dim
        lower = below.new_zeros(*below.shape[:-1], r * r).index_copy(-1, self.below_index, below)
        return lower.reshape(*below.shape[:-1], r, r) + torch.diag_embed((0.5 * log_var).exp())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        out = self.net(concat_condition(x, y))
        r = self.latent_dim
        loc, log_var, below = out[..., :r], out[..., r:2 * r], out[..., 2 * r:]
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril(log_var, below))
