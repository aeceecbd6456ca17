"""Closed-form Gaussian KL divergences, in one place, and the registration torch lacks.

* :func:`gaussian_kl_to_standard_normal`: ``KL(N(mu, diag sigma^2) || N(0, I))``;
* :func:`diagonal_gaussian_kl`: between two diagonal Gaussians;
* :func:`gaussian_kl_to_diagonal`: a correlated Gaussian against a diagonal one.

The first two are what the direct loss (:mod:`pyro_vae.infer.direct`) uses for
``meanfield``; they evaluate torch's ``Normal``-``Normal`` expression, so they
give ``kl_divergence``'s floats.

``TraceMeanField_ELBO`` uses ``kl_divergence(q, p)`` per latent site when one
is registered for the pair and silently falls back to Monte Carlo otherwise.
torch registers ``MultivariateNormal || MultivariateNormal`` but not a
correlated Gaussian guide against a diagonal Gaussian prior
(``Independent(Normal, 1)``, the ``normal`` and ``learned-normal`` priors).
Importing this module registers it, so ``--guide full`` and ``--guide lowrank``
get the analytic KL under ``meanfield``.
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


def gaussian_kl_to_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)``
    (Kingma & Welling 2014, Appendix B; docs/derivations.md, Closed-form Gaussian KL).

    :func:`diagonal_gaussian_kl` with ``m = 0`` and ``s = 1`` folded in (dividing by 1
    is exact), summed over the last dimension.
    """
    var_ratio = scale.pow(2)
    return (0.5 * (var_ratio + loc.pow(2) - 1 - var_ratio.log())).sum(-1)


def diagonal_gaussian_kl(loc_q: torch.Tensor, scale_q: torch.Tensor, loc_p: torch.Tensor,
                         scale_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag sigma^2) || N(m, diag s^2)) = 1/2 sum_j [r_j + (mu_j - m_j)^2 / s_j^2 - 1 - log r_j]``
    with ``r = sigma^2 / s^2`` (docs/derivations.md, Closed-form Gaussian KL).

    torch's ``Normal``-``Normal`` expression, summed over the last dimension.
    """
    var_ratio = (scale_q / scale_p).pow(2)
    t1 = ((loc_q - loc_p) / scale_p).pow(2)
    return (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum(-1)


def gaussian_kl_to_diagonal(loc_q: torch.Tensor, variance_q: torch.Tensor, entropy_q: torch.Tensor,
                            loc_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
    """``KL(q || N(m, diag s^2)) = H(q, p) - H(q)`` for any Gaussian ``q = N(mu, Sigma)``, from its
    mean, the diagonal of its covariance and its entropy, with the cross-entropy
    ``H(q, p) = 1/2 sum_i [log(2 pi s_i^2) + (Sigma_ii + (mu_i - m_i)^2) / s_i^2]``
    (docs/derivations.md, Closed-form Gaussian KL).  Only the diagonal of ``Sigma``
    enters, so a full or low-rank guide against a diagonal prior costs O(r)."""
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
