"""Every equation of the derivations, checked numerically against Pyro/torch."""

import math

import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussianProblem
from pyro.distributions.kl import kl_divergence

from pyro_vae.infer import equations as eq


@pytest.fixture
def gaussian():
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(6, 4, generator=g, dtype=torch.float64)
    log_var = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return loc, log_var


def test_eq6_closed_form_kl_matches_torch(gaussian):
    loc, log_var = gaussian
    q = dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)
    p = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
    assert torch.allclose(eq.gaussian_kl_to_standard_normal(loc, log_var), kl_divergence(q, p))


def test_eq6_closed_form_kl_matches_monte_carlo_within_standard_error(gaussian):
    loc, log_var = gaussian
    torch.manual_seed(0)
    n = 200_000
    eps = torch.randn(n, *loc.shape, dtype=loc.dtype)
    z = eq.reparameterize(loc, log_var, eps)
    samples = eq.diagonal_gaussian_log_density(z, loc, log_var) - eq.standard_normal_log_density(z)
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    exact = eq.gaussian_kl_to_standard_normal(loc, log_var)
    assert ((mc - exact).abs() < 4 * se).all(), (mc, exact, se)


def test_eq7_reparameterization_has_the_guide_distribution(gaussian):
    loc, log_var = gaussian
    torch.manual_seed(0)
    z = eq.reparameterize(loc, log_var, torch.randn(100_000, *loc.shape, dtype=loc.dtype))
    assert torch.allclose(z.mean(0), loc, atol=0.05)
    assert torch.allclose(z.var(0).log(), log_var, atol=0.05)
    # and it is exactly what Pyro's Normal.rsample does with the same noise
    torch.manual_seed(3)
    pyro_draw = dist.Normal(loc, (0.5 * log_var).exp()).rsample()
    torch.manual_seed(3)
    assert torch.allclose(eq.reparameterize(loc, log_var, torch.randn_like(loc)), pyro_draw)


def test_guide_and_prior_densities_match_pyro(gaussian):
    loc, log_var = gaussian
    z = torch.randn_like(loc)
    q = dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)
    assert torch.allclose(eq.diagonal_gaussian_log_density(z, loc, log_var), q.log_prob(z))
    assert torch.allclose(eq.standard_normal_log_density(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_sec16_gaussian_log_likelihood_matches_formula_and_pyro():
    x, mean = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    sigma = 0.3
    d = x.shape[-1]
    formula = -((x - mean) ** 2).sum(-1) / (2 * sigma**2) - d / 2 * math.log(2 * math.pi * sigma**2)
    assert torch.allclose(eq.gaussian_log_likelihood(x, mean, sigma), formula)
    assert torch.allclose(eq.gaussian_log_likelihood(x, mean, sigma),
                          dist.Normal(mean, sigma).log_prob(x).sum(-1))


def test_sec16_bernoulli_log_likelihood_is_negative_cross_entropy():
    x = torch.randint(0, 2, (4, 9)).double()
    logits = torch.randn(4, 9, dtype=torch.float64) * 3
    pi = torch.sigmoid(logits)
    formula = (x * pi.log() + (1 - x) * (1 - pi).log()).sum(-1)
    assert torch.allclose(eq.bernoulli_log_likelihood(x, logits), formula)
    assert torch.allclose(eq.bernoulli_log_likelihood(x, logits), dist.Bernoulli(logits=logits).log_prob(x).sum(-1))
    # stable where the naive formula overflows
    assert torch.isfinite(eq.bernoulli_log_likelihood(torch.zeros(1, 1), torch.tensor([[200.0]]))).all()


def test_eq2_eq4_eq8_monte_carlo_elbo_equals_reconstruction_minus_kl():
    """The Jensen ELBO (Eq. 2), the canonical form (Eq. 4) and the SGVB estimator (Eq. 8)
    estimate the same number; Eq. 5 averages it over the data set."""
    torch.manual_seed(0)
    p = LinearGaussianProblem(n=3)
    loc = torch.randn(3, 2, dtype=torch.float64)
    log_var = torch.randn(3, 2, dtype=torch.float64) * 0.3
    n = 200_000
    eps = torch.randn(n, 3, 2, dtype=torch.float64)
    z = eq.reparameterize(loc, log_var, eps)

    def log_lik(x, z):
        return eq.gaussian_log_likelihood(x, z @ p.W.T + p.b, p.sigma)

    log_p_xz = log_lik(p.x, z) + eq.standard_normal_log_density(z)
    log_q = eq.diagonal_gaussian_log_density(z, loc, log_var)
    jensen = eq.elbo_from_log_weights(log_p_xz, log_q)
    recon = log_lik(p.x, z).mean(0)
    canonical = eq.canonical_elbo(recon, eq.gaussian_kl_to_standard_normal(loc, log_var))
    sgvb = eq.sgvb_estimator(p.x, loc, log_var, eps, log_lik)
    se = (log_p_xz - log_q).std(0) / math.sqrt(n)
    assert ((jensen - canonical).abs() < 4 * se).all()
    assert torch.allclose(sgvb.mean(0), canonical)
    assert torch.allclose(eq.dataset_elbo(canonical), canonical.mean())
    assert (jensen < p.log_evidence()).all()


def test_eq3_kl_identity_log_evidence_is_elbo_plus_posterior_kl():
    """log p(x) = ELBO + KL(q || p(z|x)), all three in closed form for a linear-Gaussian model."""
    p = LinearGaussianProblem(n=4)
    vae = p.vae("exact")
    post = vae.encoder(p.x)  # exact posterior
    q = dist.MultivariateNormal(post.loc + 0.3, covariance_matrix=post.covariance_matrix * 1.7)
    torch.manual_seed(0)
    z = q.sample((400_000,))
    log_lik = vae.decoder(z).log_prob(p.x)
    elbo = (log_lik + dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z)).mean(0)
    gap = eq.posterior_gap(p.log_evidence(), elbo)
    assert torch.allclose(gap, kl_divergence(q, post), atol=0.02)


def test_beta_vae_objective_scales_only_the_kl():
    recon, kl = torch.tensor([-10.0]), torch.tensor([3.0])
    assert eq.canonical_elbo(recon, kl, beta=0.5).item() == pytest.approx(-11.5)
    assert eq.canonical_elbo(recon, kl, beta=4.0).item() == pytest.approx(-22.0)


def test_iwae_bound_is_log_mean_exp_and_increases_with_k():
    log_w = torch.randn(5000, 10, dtype=torch.float64) * 2
    assert torch.allclose(eq.iwae_bound(log_w[:3]), log_w[:3].exp().mean(0).log())
    # E[IWAE_K] is non-decreasing in K (Burda et al. 2015, Thm 1): average over disjoint groups
    means = [eq.iwae_bound(log_w.reshape(5000 // k, k, 10).transpose(0, 1)).mean().item()
             for k in (1, 5, 50, 500)]
    assert means == sorted(means)
