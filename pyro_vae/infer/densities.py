"""The log-densities and the reparameterized draw of the VAE's Gaussian and Bernoulli parts.

One function per equation; the object-free distributions of
:mod:`pyro_vae.infer.direct` call them, and each reproduces the expression of
the ``torch.distributions`` class it stands in for, so values agree with
Pyro's to the bit.  Shapes: the last dimension is the event dimension and is
summed; the leading (particle, batch) dimensions are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: ``torch.distributions.Normal.log_prob``'s constant, computed the way it computes it.
LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def reparameterize(loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Reparameterized draw ``z = mu + sigma * eps`` with ``eps ~ N(0, I)``
    (Kingma & Welling 2014, Sec. 2.4; docs/derivations.md, Reparameterization trick).

    ``Normal.rsample``'s own expression, so the same ``eps`` gives the same ``z``.
    """
    return loc + eps * scale


def diagonal_gaussian_log_density(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """``log N(value; mu, diag sigma^2) = sum_j [-(v_j - mu_j)^2 / (2 sigma_j^2) - log sigma_j - log sqrt(2 pi)]``:
    the diagonal Gaussian guide ``log q(z | x)`` and the Gaussian decoder's log-likelihood
    ``log p(x | z)`` (Kingma & Welling 2014, Appendix C.2; docs/derivations.md, Gaussian decoder).

    ``Normal.log_prob``'s expression with the sign moved into the denominator
    (IEEE negation is exact), summed over the last dimension.

    ``noise`` is for the guide's own draw ``value = reparameterize(loc, scale, noise)``
    (docs/derivations.md (D13)): its standardized residual ``(v - mu) / sigma`` is then
    ``noise``, so the density is ``sum_j [-eps_j^2 / 2 - log sigma_j - log sqrt(2 pi)]``.
    Same value up to rounding, and the same gradient: through the draw, ``d/d mu`` of the
    residual is zero either way.  Four fewer element-wise operations forwards and backwards.
    """
    if noise is not None:
        return (noise**2 / -2 - scale.log() - LOG_SQRT_2PI).sum(-1)
    return ((value - loc) ** 2 / (-2 * scale**2) - scale.log() - LOG_SQRT_2PI).sum(-1)


def standard_normal_log_density(value: torch.Tensor) -> torch.Tensor:
    """``log N(value; 0, I) = sum_j [-v_j^2 / 2 - log sqrt(2 pi)]``, the prior ``log p(z)``
    (Kingma & Welling 2014, Sec. 3).

    :func:`diagonal_gaussian_log_density` with ``mu = 0`` and ``sigma = 1`` folded in:
    ``v - 0``, ``/ (2 * 1)`` and ``- log 1`` change no bit.
    """
    return (value**2 / -2 - LOG_SQRT_2PI).sum(-1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor, total: bool = False) -> torch.Tensor:
    """``log p(x | z) = sum_j [x_j log pi_j + (1 - x_j) log(1 - pi_j)]`` with ``pi = sigmoid(logits)``,
    the Bernoulli decoder (Kingma & Welling 2014, Appendix C.1; docs/derivations.md, Bernoulli decoder).

    Computed stably as minus the binary cross-entropy with logits, negated after the
    sum (exact, one full-size op fewer).  ``x`` broadcasts against ``logits``
    (particles on the left of the data).  ``total=True`` sums over every dimension,
    the batch too, in the cross-entropy's own reduction: no per-pixel tensor is kept,
    which is what a loss summed over the data needs.
    """
    if x.shape != logits.shape:
        logits, x = torch.broadcast_tensors(logits, x)
    if total:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
