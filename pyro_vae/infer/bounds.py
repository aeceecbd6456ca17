"""The bounds on ``log p(x)`` computed from importance log-weights, in one place.

With draws ``z_k ~ q(z | x)``, ``k = 1..K``, and log-weights
``log w_k = log p(x, z_k) - log q(z_k | x)`` (:mod:`pyro_vae.infer.weights`):

* ELBO (Kingma & Welling 2014), the mean ``(1/K) sum_k log w_k``;
* IWAE bound (Burda et al. 2016), ``log (1/K) sum_k w_k``, which rises with
  ``K`` towards ``log p(x)``; with ``K = 5000`` it is the importance-sampled
  test log-likelihood;
* Renyi bound (Li & Turner 2016), ``1/(1-a) log (1/K) sum_k w_k^(1-a)``: the
  IWAE bound at ``a = 0``, the ELBO as ``a -> 1``, below the ELBO for ``a > 1``;
* MIWAE and CIWAE bounds (Rainforth et al. 2018), the mean of ``M`` IWAE bounds
  of ``L`` draws each and the convex combination of the ELBO and the IWAE bound;

and, from a reconstruction term and a KL, the canonical (beta-weighted) ELBO
(:func:`canonical_elbo`, :func:`sgvb_estimator`) and the gap that the KL
identity makes of ``log p(x) - ELBO`` (:func:`posterior_gap`).

Every objective, fast estimator, evaluator and test calls these functions;
see ``docs/derivations.md`` for the derivations.  The particle dimension is
``dim`` (0 by default); the other dimensions are kept.
"""

from __future__ import annotations

import math

import torch


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log (1/K) sum_k exp(values_k)`` over ``dim`` (size ``K``), computed stably."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def elbo_bound(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Monte Carlo ELBO ``(1/K) sum_k log w_k``, ``log w = log p(x, z) - log q(z | x)``,
    an unbiased estimate of ``E_q[log p(x, z) - log q(z | x)]`` (Kingma & Welling 2014,
    Eq. 3 and the SGVB estimator A, Eq. 6; docs/derivations.md, The ELBO by Jensen's inequality)."""
    return log_weights.mean(dim)


def canonical_elbo(reconstruction: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``E_q[log p(x | z)] - beta KL(q(z | x) || p(z))``: the ELBO in its canonical form
    (Kingma & Welling 2014, Eq. 3; docs/derivations.md, The ELBO) and, for ``beta != 1``,
    the beta-VAE objective (Higgins et al. 2017, Eq. 4; docs/derivations.md, beta-VAE and
    KL warm-up).  Elementwise; ``beta = 1`` adds no operation."""
    return reconstruction - kl if beta == 1.0 else reconstruction - beta * kl


def sgvb_estimator(log_likelihoods: torch.Tensor, kl: torch.Tensor, beta: float = 1.0,
                   dim: int = 0) -> torch.Tensor:
    """The SGVB estimator B (Kingma & Welling 2014, Eq. 7), beta-weighted:
    ``(1/K) sum_k log p(x | z_k) - beta KL(q(z | x) || p(z))`` with reparameterized draws
    ``z_k = mu + sigma * eps_k`` along ``dim`` of ``log_likelihoods`` and the closed-form KL;
    with ``K = 1`` the single-sample estimator (docs/derivations.md, The SGVB estimator)."""
    return canonical_elbo(elbo_bound(log_likelihoods, dim), kl, beta)


def iwae_bound(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Importance-weighted bound ``log (1/K) sum_k w_k`` (Burda et al. 2016, Eq. 8;
    docs/derivations.md, IWAE bound)."""
    return log_mean_exp(log_weights, dim)


def renyi_bound(log_weights: torch.Tensor, alpha: float, dim: int = 0) -> torch.Tensor:
    """Renyi bound ``1/(1-alpha) log (1/K) sum_k w_k^(1-alpha)`` (Li & Turner 2016, Eq. 12;
    docs/derivations.md, Renyi bound).

    ``alpha = 0`` is :func:`iwae_bound`; ``alpha = 1`` (the ELBO, as a limit) is refused.
    """
    alpha = float(alpha)
    if alpha == 1.0:
        raise ValueError("the Renyi bound with alpha=1 is the ELBO (a limit, not this formula); "
                         "choose alpha != 1 or use the ELBO")
    if alpha == 0.0:
        return log_mean_exp(log_weights, dim)
    return log_mean_exp((1.0 - alpha) * log_weights, dim) / (1.0 - alpha)


def self_normalized_weights(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``w~_k = w_k / sum_j w_j`` over ``dim``: the weights of the IWAE gradient
    ``sum_k w~_k grad log w_k`` (Burda et al. 2016; (D46) in docs/derivations.md, IWAE and
    Renyi gradients), computed stably as a softmax of the log-weights."""
    return torch.softmax(log_weights, dim=dim)


def miwae_bound(log_weights: torch.Tensor, groups: int, dim: int = 0) -> torch.Tensor:
    """MIWAE bound ``(1/M) sum_m log (1/L) sum_l w_ml``: the mean of ``M = groups`` IWAE bounds
    of ``L = K / M`` draws each, the ``K`` draws along ``dim`` taken as ``M`` consecutive groups
    (Rainforth et al. 2018, "Tighter variational bounds are not necessarily better"; (D48) in
    docs/derivations.md, PIWAE, MIWAE and CIWAE).

    ``groups = 1`` is :func:`iwae_bound`, ``groups = K`` is :func:`elbo_bound`.
    """
    k = log_weights.shape[dim]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or k % groups:
        raise ValueError(f"MIWAE needs a number of groups M that divides the {k} draws per point, got {groups!r}")
    values = log_weights.movedim(dim, 0)
    grouped = values.reshape(groups, k // groups, *values.shape[1:])
    return iwae_bound(grouped, dim=1).mean(0)


def ciwae_bound(log_weights: torch.Tensor, beta: float, dim: int = 0) -> torch.Tensor:
    """CIWAE bound ``beta (1/K) sum_k log w_k + (1 - beta) log (1/K) sum_k w_k`` with
    ``beta`` in [0, 1]: the convex combination of :func:`elbo_bound` and :func:`iwae_bound`
    on the same ``K`` draws (Rainforth et al. 2018; (D49) in docs/derivations.md, PIWAE, MIWAE
    and CIWAE)."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"the CIWAE weight beta must be a number in [0, 1], got {beta!r}")
    return beta * elbo_bound(log_weights, dim) + (1.0 - beta) * iwae_bound(log_weights, dim)


def grouped_iwae_bound(log_weights: torch.Tensor, k: int) -> torch.Tensor:
    """IWAE bound with ``k`` particles from ``(K, ...)`` log-weights, averaged over the
    ``floor(K / k)`` disjoint groups of ``k`` draws: every ``k <= K`` from one set of draws
    (the :func:`miwae_bound` of the first ``k floor(K / k)`` draws)."""
    groups = log_weights.shape[0] // k
    if k < 1 or groups < 1:
        raise ValueError(f"IWAE with k={k} needs 1 <= k <= {log_weights.shape[0]} draws per point")
    return miwae_bound(log_weights[:groups * k], groups)


def posterior_gap(log_evidence: torch.Tensor, elbo: torch.Tensor) -> torch.Tensor:
    """``log p(x) - ELBO = KL(q(z | x) || p(z | x)) >= 0``, the KL identity
    (Kingma & Welling 2014, Eq. 1; docs/derivations.md, The KL identity and the gap): how far the
    guide is from the true posterior, estimated with ``log p(x)`` from a large-K IWAE bound."""
    return log_evidence - elbo


class StreamingLogMeanExp:
    """:func:`log_mean_exp` over the particle dimension, fed in chunks of particles.

    Keeps a running maximum and a rescaled sum per point, so the full ``(K, B)``
    array never has to exist; the result equals ``log_mean_exp`` of all chunks
    stacked.
    """

    def __init__(self) -> None:
        self.shift: torch.Tensor | None = None  # finite running maximum (0 where all are -inf)
        self.sum: torch.Tensor | None = None    # sum_k exp(a_k - shift)
        self.count = 0

    def update(self, chunk: torch.Tensor) -> None:
        """Add a ``(P, B)`` chunk of log-values."""
        chunk_max = chunk.max(0).values
        if self.shift is not None:
            chunk_max = torch.maximum(self.shift, chunk_max)
        shift = torch.where(torch.isfinite(chunk_max), chunk_max, torch.zeros_like(chunk_max))
        chunk_sum = (chunk - shift).exp().sum(0)
        self.sum = chunk_sum if self.sum is None else self.sum * (self.shift - shift).exp() + chunk_sum
        self.shift = shift
        self.count += chunk.shape[0]

    def result(self) -> torch.Tensor:
        """``(B,)`` log-mean-exp over every particle added so far."""
        if self.sum is None:
            raise ValueError("no chunks were added")
        return self.shift + self.sum.log() - math.log(self.count)
