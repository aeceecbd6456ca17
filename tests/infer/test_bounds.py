"""pyro_vae.infer.bounds: the ELBO, its canonical and SGVB forms, IWAE, Renyi and the KL identity gap.

The linear-Gaussian model (tests/linear_gaussian.py) gives the exact log p(x)
and posterior, so every identity is checked against closed forms, with Monte
Carlo tolerances of 4 standard errors.
"""

import math

import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussianProblem
from pyro.distributions.kl import kl_divergence

from pyro_vae.infer.bounds import (
    StreamingLogMeanExp,
    canonical_elbo,
    elbo_bound,
    grouped_iwae_bound,
    iwae_bound,
    log_mean_exp,
    posterior_gap,
    renyi_bound,
    sgvb_estimator,
)
from pyro_vae.infer.densities import (
    diagonal_gaussian_log_density,
    reparameterize,
    standard_normal_log_density,
)
from pyro_vae.infer.kl import gaussian_kl_to_standard_normal

N_MC = 200_000


def linear_gaussian_draws(problem, n=N_MC):
    """A diagonal Gaussian q for each point, its reparameterized draws and the per-draw terms."""
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(problem.x.shape[0], 2, generator=g, dtype=torch.float64) * 0.5
    scale = (0.3 * torch.randn(problem.x.shape[0], 2, generator=g, dtype=torch.float64)).exp()
    eps = torch.randn(n, *loc.shape, generator=g, dtype=torch.float64)
    z = reparameterize(loc, scale, eps)
    mean = z @ problem.W.T + problem.b
    log_lik = diagonal_gaussian_log_density(problem.x, mean, torch.full_like(mean, problem.sigma))
    log_w = log_lik + standard_normal_log_density(z) - diagonal_gaussian_log_density(z, loc, scale)
    return loc, scale, log_lik, log_w


def test_the_elbo_in_its_three_forms_estimates_one_number_below_log_evidence():
    """Jensen (mean log-weight), canonical (reconstruction - KL) and SGVB agree; all < log p(x)."""
    problem = LinearGaussianProblem(n=3)
    loc, scale, log_lik, log_w = linear_gaussian_draws(problem)
    kl = gaussian_kl_to_standard_normal(loc, scale)
    jensen = elbo_bound(log_w)
    canonical = canonical_elbo(log_lik.mean(0), kl)
    se = log_w.std(0) / math.sqrt(log_w.shape[0])
    assert ((jensen - canonical).abs() < 4 * se).all()
    assert torch.equal(sgvb_estimator(log_lik, kl), canonical)
    single = sgvb_estimator(log_lik[:1], kl)  # the single-sample estimator is one draw's value
    assert torch.allclose(single, log_lik[0] - kl)
    assert (jensen < problem.log_evidence()).all()


def test_beta_weights_only_the_kl():
    recon, kl = torch.tensor([-10.0]), torch.tensor([3.0])
    assert canonical_elbo(recon, kl, beta=0.5).item() == pytest.approx(-11.5)
    assert canonical_elbo(recon, kl, beta=4.0).item() == pytest.approx(-22.0)
    assert canonical_elbo(recon, kl).item() == pytest.approx(-13.0)
    assert sgvb_estimator(torch.tensor([[-9.0], [-11.0]]), kl, beta=0.0).item() == pytest.approx(-10.0)


def test_the_kl_identity_gap_is_the_kl_to_the_exact_posterior():
    """log p(x) - ELBO = KL(q(z | x) || p(z | x)), all in closed form for the linear-Gaussian model."""
    problem = LinearGaussianProblem(n=4)
    vae = problem.vae("exact")
    post = vae.encoder(problem.x)
    q = dist.MultivariateNormal(post.loc + 0.3, covariance_matrix=post.covariance_matrix * 1.7)
    torch.manual_seed(0)
    z = q.sample((N_MC,))
    log_w = vae.decoder(z).log_prob(problem.x) + dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z)
    gap = posterior_gap(problem.log_evidence(), elbo_bound(log_w))
    se = log_w.std(0) / math.sqrt(N_MC)
    assert ((gap - kl_divergence(q, post)).abs() < 4 * se).all()
    assert (gap > 0).all()


def test_iwae_is_log_mean_exp_rises_with_k_and_stays_below_log_evidence():
    problem = LinearGaussianProblem(n=3)
    *_, log_w = linear_gaussian_draws(problem, n=50_000)
    assert torch.allclose(iwae_bound(log_w[:3]), log_w[:3].exp().mean(0).log())
    means = [grouped_iwae_bound(log_w, k).mean().item() for k in (1, 10, 100, 1000)]
    assert means == sorted(means)
    assert means[0] == pytest.approx(elbo_bound(log_w).mean().item(), rel=1e-9)
    assert means[-1] < problem.log_evidence().mean().item()
    assert means[-1] > means[0] + 0.05


def test_renyi_interpolates_between_iwae_and_the_elbo():
    problem = LinearGaussianProblem(n=3)
    *_, log_w = linear_gaussian_draws(problem, n=20)
    assert torch.equal(renyi_bound(log_w, 0.0), iwae_bound(log_w))
    near_one = renyi_bound(log_w, 1 - 1e-6)
    assert torch.allclose(near_one, elbo_bound(log_w), atol=1e-3)
    values = [renyi_bound(log_w, a) for a in (-1.0, 0.0, 0.5, 2.0)]
    for high, low in zip(values, values[1:]):  # decreasing in alpha
        assert (high >= low - 1e-12).all()
    manual = (((1 - 0.5) * log_w).exp().mean(0)).log() / (1 - 0.5)
    assert torch.allclose(renyi_bound(log_w, 0.5), manual)
    with pytest.raises(ValueError, match="alpha=1"):
        renyi_bound(log_w, 1.0)


def test_streaming_log_mean_exp_equals_the_stacked_one():
    torch.manual_seed(0)
    values = torch.randn(37, 5) * 30
    values[:, 0] = -math.inf
    acc = StreamingLogMeanExp()
    for chunk in values.split(8):
        acc.update(chunk)
    expected = log_mean_exp(values)
    assert torch.allclose(acc.result()[1:], expected[1:]) and acc.result()[0] == -math.inf
