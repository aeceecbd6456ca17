"""A guide network a user writes as a plain ``nn.Module``, imported by path from the CLI
(``--guide user_parts:SmallGuide``): no base class, no pyro-vae import."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class SmallGuide(nn.Module):
    """q(z | x) = N(mu(x), diag sigma(x)^2) with one hidden layer of its own size."""

    def __init__(self, input_dim: int, latent_dim: int, width: int = 24) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(nn.Linear(input_dim, width), nn.Softplus(), nn.Linear(width, 2 * latent_dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        loc, scale = self.net(x).chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(scale) + 1e-3).to_event(1)
