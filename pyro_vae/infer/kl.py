"""Closed-form KL divergences that Pyro/torch do not register but the guides need.

``TraceMeanField_ELBO`` uses ``kl_divergence(q, p)`` per latent site when one is
registered for the pair and silently falls back to Monte Carlo otherwise.
torch registers ``MultivariateNormal || MultivariateNormal`` but not a
correlated Gaussian guide against a diagonal Gaussian prior
(``Independent(Normal, 1)``, the ``normal`` and ``learned-normal`` priors).
Importing this module registers it, so ``--guide full`` and ``--guide lowrank``
get the analytic KL (Eq. (6) generalised) under ``meanfield``.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from torch.distributions.kl import register_kl

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl_to_diagonal(loc_q: torch.Tensor, variance_q: torch.Tensor, entropy_q: torch.Tensor,
                            loc_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
    """KL(q || N(loc_p, diag(scale_p^2))) for any Gaussian q, from its mean, the diagonal
    of its covariance and its entropy:  KL = H(q, p) - H(q) with cross-entropy
    ``H(q, p) = 1/2 sum_i [log(2 pi s_i^2) + (Sigma_ii + (mu_i - m_i)^2) / s_i^2]``."""
    var_p = scale_p.pow(2)
    cross_entropy = 0.5 * (LOG_2PI + var_p.log() + (variance_q + (loc_q - loc_p).pow(2)) / var_p).sum(-1)
    return cross_entropy - entropy_q


@register_kl(MultivariateNormal, Independent)
@register_kl(LowRankMultivariateNormal, Independent)
def _kl_correlated_gaussian_diagonal_gaussian(q, p) -> torch.Tensor:
    base = p.base_dist
    if not isinstance(base, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError  # not a diagonal Gaussian: no closed form registered
    if q.event_shape != p.event_shape:
        raise ValueError(f"KL between Gaussians of event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    return gaussian_kl_to_diagonal(q.loc, q.variance, q.entropy(), base.loc, base.scale)
