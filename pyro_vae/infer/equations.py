"""Named homes for the equations of the VAE derivations.

Each function implements one numbered equation of ``shared/seeds`` ("Variational
Autoencoder - Derivations & Proofs", referred to below as *the derivations*) in
plain torch, so it can be read beside the paper and checked numerically against
Pyro's own distributions and estimators (``tests/test_equations.py``).  The Pyro
model/guide pair in :mod:`pyro_vae.models.vae` never calls these on its hot path: Pyro
computes the same quantities from traces.  They are the reference the library is
tested against, and the vocabulary of the evaluation code.

Shapes: ``x`` is ``(..., d)``, ``z``/``loc``/``log_var`` are ``(..., r)``; every
function sums over the last (event) dimension and keeps the leading ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl_to_standard_normal(loc: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, diag sigma^2) || N(0, I)), Eq. (6).

    ``KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)`` with the encoder's
    log-variance ``l = log sigma^2`` as input, as in Sec. 1.5.
    """
    return 0.5 * (loc.pow(2) + log_var.exp() - log_var - 1.0).sum(-1)


def reparameterize(loc: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Reparameterized draw ``z = mu + sigma * eps`` with ``sigma = exp(l / 2)``, Eq. (7)."""
    return loc + (0.5 * log_var).exp() * eps


def diagonal_gaussian_log_density(z: torch.Tensor, loc: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(l)), summed over the event dimension (the encoder of Sec. 1.2)."""
    return -0.5 * ((z - loc).pow(2) / log_var.exp() + log_var + _LOG_2PI).sum(-1)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), the prior p(z) of Sec. 1.2."""
    return -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma_x: float | torch.Tensor) -> torch.Tensor:
    """Gaussian decoder, Sec. 1.6: ``-||x - mu||^2 / (2 sigma_x^2) - d/2 log(2 pi sigma_x^2)``.

    ``sigma_x`` may be a scalar or broadcast per pixel (then the constant is summed
    per pixel, which reduces to the formula above for a scalar).
    """
    sigma_x = torch.as_tensor(sigma_x, dtype=x.dtype, device=x.device)
    var = sigma_x.pow(2)
    return (-(x - mean).pow(2) / (2.0 * var) - 0.5 * torch.log(2.0 * math.pi * var)).sum(-1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Bernoulli decoder, Sec. 1.6: ``sum_j [x_j log pi_j + (1 - x_j) log(1 - pi_j)]``.

    The derivations print this with a leading minus sign; that is the
    *reconstruction loss* (binary cross-entropy), not the log-likelihood. We
    compute the log-likelihood from logits, ``pi = sigmoid(logits)``, in the
    numerically stable form ``-BCEWithLogits``.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def elbo_from_log_weights(log_p_xz: torch.Tensor, log_q_z: torch.Tensor) -> torch.Tensor:
    """Monte Carlo ELBO, Eq. (2): ``E_q[log p(x, z) - log q(z | x)]``.

    Inputs are ``(S, ...)`` per-sample values for ``S`` draws ``z ~ q``; the mean
    over the leading dimension estimates the expectation.
    """
    return (log_p_xz - log_q_z).mean(0)


def canonical_elbo(reconstruction: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. (4), and the beta-VAE objective of Sec. 1.10 when ``beta != 1``:
    ``E_q[log p(x | z)] - beta * KL(q(z | x) || p(z))``."""
    return reconstruction - beta * kl


def sgvb_estimator(x: torch.Tensor, loc: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor,
                   log_likelihood) -> torch.Tensor:
    """Single-sample SGVB estimator, Eq. (8): ``log p(x | mu + sigma * eps) - KL(q || p)``.

    ``log_likelihood(x, z)`` is the decoder's log-density, e.g. a closure over
    :func:`bernoulli_log_likelihood`.
    """
    z = reparameterize(loc, log_var, eps)
    return log_likelihood(x, z) - gaussian_kl_to_standard_normal(loc, log_var)


def dataset_elbo(per_point_elbo: torch.Tensor) -> torch.Tensor:
    """Data-set objective, Eq. (5): the mean of the per-point ELBOs."""
    return per_point_elbo.mean()


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """Importance-weighted bound of Sec. 1.10 (Burda et al. 2015).

    ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` from log-weights of shape
    ``(K, ...)``; with ``K`` large it is the importance-sampled estimate of
    ``log p(x)`` used for test log-likelihoods.
    """
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)


def posterior_gap(log_px: torch.Tensor, elbo: torch.Tensor) -> torch.Tensor:
    """KL identity, Eq. (3): ``KL(q(z | x) || p(z | x)) = log p(x) - ELBO`` (the gap of Sec. 1.8)."""
    return log_px - elbo
