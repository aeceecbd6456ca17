"""Test-set bounds from per-point importance log-weights (see :mod:`pyro_vae.importance`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .equations import iwae_bound
from .importance import log_weights
from .vae import VAE


@dataclass
class Estimate:
    """Mean over data points, its standard error, and the number of points (nats)."""

    mean: float
    stderr: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n}


def summarize(per_point: torch.Tensor) -> Estimate:
    n = per_point.numel()
    sd = per_point.std().item() if n > 1 else 0.0
    return Estimate(per_point.mean().item(), sd / math.sqrt(n), n)


@torch.no_grad()
def per_point_bounds(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1,
                     batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per-point ELBO (Eq. 2, averaged over ``num_particles`` draws), its
    reconstruction and KL parts, and the IWAE bound with ``K = num_particles``."""
    out: dict[str, list[torch.Tensor]] = {"elbo": [], "reconstruction": [], "kl": [], "iwae": []}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        yb = None if y is None else y[start:start + batch_size]
        lw, recon, latent = log_weights(vae, xb, yb, num_particles)
        out["elbo"].append(lw.mean(0))
        out["reconstruction"].append(recon.mean(0))
        out["kl"].append(-latent.mean(0))
        out["iwae"].append(iwae_bound(lw))
    return {k: torch.cat(v) for k, v in out.items()}


def test_set_bounds(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1,
              batch_size: int = 500) -> dict[str, dict[str, float]]:
    """Mean and standard error of each per-point bound over ``x``."""
    return {k: summarize(v).as_dict() for k, v in per_point_bounds(vae, x, y, num_particles, batch_size).items()}
