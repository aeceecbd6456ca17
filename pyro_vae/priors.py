"""Priors p(z): modules that return a Pyro distribution for the latent site.

A prior's ``forward(batch_size, y=None)`` returns a distribution whose batch
shape is ``(batch_size,)`` (the data plate) and whose event shape is the latent
shape, so the same object serves under ``pyro.plate("data")`` with or without a
leading vectorized particle dimension.
"""

from __future__ import annotations

import torch
from torch import nn

import pyro.distributions as dist


class Prior(nn.Module):
    """Base class: ``forward(batch_size, y=None) -> Distribution`` over ``z``."""

    latent_dim: int

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError


class StandardNormalPrior(Prior):
    """p(z) = N(0, I_r), the prior of Sec. 1.2 of the derivations."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        # Buffers follow ``.to(device)``, so the prior lives where the model does.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).expand([batch_size, self.latent_dim]).to_event(1)
