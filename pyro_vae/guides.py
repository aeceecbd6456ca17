"""Amortized guides q(z | x): encoders that return a Pyro distribution.

An encoder's ``forward(x, y=None)`` maps a batch ``x`` of shape ``(B, d)`` (and
an optional one-hot label ``y`` of shape ``(B, c)``) to a distribution with
batch shape ``(B,)`` and event shape ``(r,)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import pyro.distributions as dist

from .networks import mlp


def concat_condition(inputs: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Append the conditioning vector ``y`` to ``inputs``, broadcasting leading (particle) dims."""
    if y is None:
        return inputs
    y = y.to(inputs.dtype).expand(*inputs.shape[:-1], y.shape[-1])
    return torch.cat([inputs, y], dim=-1)


class Encoder(nn.Module):
    """Base class: ``forward(x, y=None) -> Distribution`` over ``z``."""

    latent_dim: int

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError


class DiagonalGaussianEncoder(Encoder):
    """q(z | x) = N(mu(x), diag(sigma^2(x))) with an MLP that outputs ``mu`` and
    the log-variance ``l = log sigma^2`` (Sec. 1.5); ``sigma = exp(l / 2)`` so a
    draw is the reparameterized ``z = mu + sigma * eps`` of Eq. (7)."""

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu", condition_dim: int = 0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp(input_dim + condition_dim, hidden, 2 * latent_dim, activation)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, log_var)``, each of shape ``(..., r)``."""
        loc, log_var = self.net(concat_condition(x, y)).chunk(2, dim=-1)
        return loc, log_var

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        loc, log_var = self.encode(x, y)
        return dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)
