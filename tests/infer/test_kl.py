"""pyro_vae.infer.kl: the closed-form Gaussian KLs the direct loss and meanfield use.

Each is checked against ``torch.distributions.kl_divergence`` and against a
Monte Carlo estimate ``mean(log q(z) - log p(z))``, ``z ~ q``, within 4
standard errors.
"""

import math

import pyro.distributions as dist
import torch
from pyro.distributions.kl import kl_divergence

from pyro_vae.infer.kl import (
    diagonal_gaussian_kl,
    gaussian_kl_to_diagonal,
    gaussian_kl_to_standard_normal,
)

N_MC = 200_000


def gaussians(seed=1, shape=(6, 4)):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(*shape, generator=g, dtype=torch.float64)
    scale = (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).exp()
    return loc, scale


def within_standard_errors(samples: torch.Tensor, exact: torch.Tensor, k: float = 4.0) -> bool:
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((mc - exact).abs() < k * se).all())


def test_kl_to_the_standard_normal_equals_torch_and_monte_carlo():
    loc, scale = gaussians()
    q = dist.Normal(loc, scale).to_event(1)
    p = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
    exact = gaussian_kl_to_standard_normal(loc, scale)
    assert torch.allclose(exact, kl_divergence(q, p), rtol=1e-12)
    loc32, scale32 = loc.float(), scale.float()  # torch's own floats, to the bit
    assert torch.equal(gaussian_kl_to_standard_normal(loc32, scale32), kl_divergence(
        dist.Normal(loc32, scale32).to_event(1), dist.Normal(0.0, 1.0).expand([6, 4]).to_event(1)))
    torch.manual_seed(0)
    z = q.sample((N_MC,))
    assert within_standard_errors(q.log_prob(z) - p.log_prob(z), exact)
    # and the closed form is the textbook one: 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)
    textbook = 0.5 * (loc**2 + scale**2 - 1 - (scale**2).log()).sum(-1)
    assert torch.allclose(exact, textbook)


def test_kl_between_diagonal_gaussians_equals_torch_to_the_bit_and_monte_carlo():
    loc_q, scale_q = gaussians(1)
    loc_p, scale_p = gaussians(2, (4,))
    q = dist.Normal(loc_q, scale_q).to_event(1)
    p = dist.Normal(loc_p, scale_p).expand([6, 4]).to_event(1)
    exact = diagonal_gaussian_kl(loc_q, scale_q, loc_p, scale_p)
    assert torch.equal(exact, kl_divergence(q, p))
    torch.manual_seed(0)
    z = q.sample((N_MC,))
    assert within_standard_errors(q.log_prob(z) - p.log_prob(z), exact)
    assert not torch.allclose(exact, gaussian_kl_to_standard_normal(loc_q, scale_q))  # p is not N(0, I)


def test_correlated_to_diagonal_kl_equals_the_full_covariance_formula_and_monte_carlo():
    g = torch.Generator().manual_seed(3)
    loc_q = torch.randn(5, 3, generator=g, dtype=torch.float64)
    factor = torch.randn(5, 3, 3, generator=g, dtype=torch.float64) * 0.5
    cov = factor @ factor.transpose(-1, -2) + 0.3 * torch.eye(3, dtype=torch.float64)
    q = dist.MultivariateNormal(loc_q, covariance_matrix=cov)
    loc_p, scale_p = gaussians(4, (3,))
    p = dist.Normal(loc_p, scale_p).expand([5, 3]).to_event(1)
    exact = gaussian_kl_to_diagonal(q.loc, q.variance, q.entropy(), loc_p, scale_p)
    as_full = dist.MultivariateNormal(loc_p, covariance_matrix=torch.diag(scale_p**2))
    assert torch.allclose(exact, kl_divergence(q, as_full), rtol=1e-10)
    assert torch.allclose(kl_divergence(q, p), exact)  # the registration torch lacks uses it
    torch.manual_seed(0)
    z = q.sample((N_MC,))
    assert within_standard_errors(q.log_prob(z) - p.log_prob(z), exact)


def test_low_rank_guides_get_the_registered_kl_too():
    g = torch.Generator().manual_seed(5)
    q = dist.LowRankMultivariateNormal(torch.randn(4, 3, generator=g), torch.randn(4, 3, 2, generator=g) * 0.3,
                                       torch.rand(4, 3, generator=g) + 0.5)
    p = dist.Normal(torch.zeros(3), torch.ones(3)).expand([4, 3]).to_event(1)
    full = dist.MultivariateNormal(q.loc, covariance_matrix=q.covariance_matrix)
    standard = dist.MultivariateNormal(torch.zeros(3), covariance_matrix=torch.eye(3))
    assert torch.allclose(kl_divergence(q, p), kl_divergence(full, standard), rtol=1e-5)
