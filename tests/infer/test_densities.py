"""pyro_vae.infer.densities: the draw and log-densities the direct path evaluates, against torch."""

import math

import pyro.distributions as dist
import torch

from pyro_vae.infer.densities import (
    bernoulli_log_likelihood,
    diagonal_gaussian_log_density,
    reparameterize,
    standard_normal_log_density,
)


def test_the_reparameterized_draw_is_normal_rsample_to_the_bit_and_has_the_guide_distribution():
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    torch.manual_seed(1)
    expected = dist.Normal(loc, scale).rsample()
    torch.manual_seed(1)
    assert torch.equal(reparameterize(loc, scale, torch.empty(5, 3).normal_()), expected)
    z = reparameterize(loc.double(), scale.double(), torch.randn(200_000, 5, 3, dtype=torch.float64))
    assert torch.allclose(z.mean(0), loc.double(), atol=0.02)
    assert torch.allclose(z.std(0), scale.double(), atol=0.02)


def test_gaussian_log_densities_are_normal_log_prob_to_the_bit():
    torch.manual_seed(0)
    loc, scale, z = torch.randn(4, 3), torch.rand(4, 3) + 0.2, torch.randn(2, 4, 3)
    assert torch.equal(diagonal_gaussian_log_density(z, loc, scale), dist.Normal(loc, scale).to_event(1).log_prob(z))
    assert torch.equal(standard_normal_log_density(z), dist.Normal(0.0, 1.0).expand([3]).to_event(1).log_prob(z))
    # the formula: -||x - mu||^2 / (2 sigma^2) - d/2 log(2 pi sigma^2) for a scalar sigma
    x, mean, sigma = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), 0.3
    formula = -((x - mean) ** 2).sum(-1) / (2 * sigma**2) - 7 / 2 * math.log(2 * math.pi * sigma**2)
    assert torch.allclose(diagonal_gaussian_log_density(x, mean, torch.full_like(x, sigma)), formula)


def test_bernoulli_log_likelihood_is_x_log_pi_plus_one_minus_x_log_one_minus_pi():
    x = torch.randint(0, 2, (4, 9)).double()
    logits = torch.randn(4, 9, dtype=torch.float64) * 3
    pi = torch.sigmoid(logits)
    formula = (x * pi.log() + (1 - x) * (1 - pi).log()).sum(-1)  # no leading minus: a log-likelihood
    assert torch.allclose(bernoulli_log_likelihood(x, logits), formula)
    assert (bernoulli_log_likelihood(x, logits) < 0).all()
    logits32, x32 = torch.randn(2, 4, 9), x.float()  # particles on the left broadcast against the data
    assert torch.equal(bernoulli_log_likelihood(x32, logits32), dist.Bernoulli(logits=logits32).to_event(1).log_prob(x32))
    # stable where the naive formula overflows
    assert torch.isfinite(bernoulli_log_likelihood(torch.zeros(1, 1), torch.tensor([[200.0]]))).all()


def test_the_guide_density_at_its_own_draw_from_the_noise_has_the_same_value_and_gradient():
    torch.manual_seed(0)
    loc = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    log_scale = (0.3 * torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
    eps = torch.randn(6, 4, dtype=torch.float64)

    def density(noise):
        scale = log_scale.exp()
        z = reparameterize(loc, scale, eps)
        return diagonal_gaussian_log_density(z, loc, scale, noise)

    recomputed, from_noise = density(None), density(eps)
    assert torch.allclose(from_noise, recomputed, rtol=1e-12)
    expected = torch.autograd.grad(recomputed.sum(), (loc, log_scale))
    got = torch.autograd.grad(from_noise.sum(), (loc, log_scale), allow_unused=True)
    assert got[0] is None and torch.allclose(expected[0], torch.zeros_like(loc), atol=1e-12)  # d/d mu is zero
    assert torch.allclose(got[1], expected[1], rtol=1e-10, atol=1e-12)
    # the noise is taken as given: other noise, another density
    assert not torch.allclose(diagonal_gaussian_log_density(reparameterize(loc, log_scale.exp(), eps), loc,
                                                            log_scale.exp(), 2 * eps), recomputed)


def test_the_bernoulli_total_is_the_sum_of_the_per_point_log_likelihoods():
    torch.manual_seed(0)
    logits, x = torch.randn(3, 5, 9, dtype=torch.float64), torch.randint(0, 2, (5, 9)).double()
    total = bernoulli_log_likelihood(x, logits, total=True)
    assert total.dim() == 0
    assert torch.allclose(total, bernoulli_log_likelihood(x, logits).sum(), rtol=1e-12)
