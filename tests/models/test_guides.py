"""Guides q(z | x): log-densities against closed forms, shapes under plates and particles,
and the analytic-KL report that decides what ``meanfield`` computes."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence

from pyro_vae.infer.kl import gaussian_kl_to_diagonal
from pyro_vae.infer.objectives import analytic_kl_sites
from pyro_vae.models.flows import IAFEncoder
from pyro_vae.models.guides import (
    DiagonalGaussianEncoder,
    FullCovarianceEncoder,
    LowRankGaussianEncoder,
)
from pyro_vae.models.registry import GUIDES, build_vae
from pyro_vae.train.config import TrainConfig

from conftest import grid_mass, perturb

D, R = 6, 3


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def test_full_covariance_scale_is_lower_triangular_with_positive_diagonal():
    enc = FullCovarianceEncoder(D, R, hidden=[8])
    x = torch.rand(5, D)
    rows, cols = torch.tril_indices(R, R, offset=-1)
    assert (enc(x).scale_tril[..., rows, cols] == 0).all()  # starts as the diagonal guide
    L = perturb(enc)(x).scale_tril
    assert torch.equal(L, L.tril())
    assert (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert (L[..., rows, cols].abs() > 0).all()  # the off-diagonal entries are used once trained


def test_correlated_guides_start_as_the_diagonal_guide_and_their_correlations_get_gradients():
    for enc in (FullCovarianceEncoder(D, R, hidden=[8]), LowRankGaussianEncoder(D, R, rank=2, hidden=[8])):
        q = enc(torch.rand(5, D))
        cov = q.covariance_matrix
        assert torch.equal(cov, torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1)))
        (q.rsample() ** 2).sum().backward()  # a reparameterized draw reaches the correlation outputs
        assert enc.net[-1].weight.grad[2 * R:].abs().sum() > 0


def test_lowrank_log_density_matches_full_covariance_gaussian_with_same_covariance():
    enc = perturb(LowRankGaussianEncoder(D, R, rank=2, hidden=[8]))
    q = enc(torch.rand(5, D))
    cov = q.cov_factor @ q.cov_factor.transpose(-1, -2) + torch.diag_embed(q.cov_diag)
    full = dist.MultivariateNormal(q.loc, covariance_matrix=cov)
    z = torch.randn(7, 5, R)
    assert torch.allclose(q.log_prob(z), full.log_prob(z), atol=1e-4)


def test_full_covariance_with_zero_correlations_is_the_diagonal_guide():
    full = FullCovarianceEncoder(D, R, hidden=[8])
    diag = DiagonalGaussianEncoder(D, R, hidden=[8])
    with torch.no_grad():  # copy the diagonal guide's weights; zero the below-diagonal outputs
        for target, source in zip(full.net, diag.net):
            if isinstance(target, torch.nn.Linear):
                rows = source.weight.shape[0]
                target.weight.zero_()
                target.bias.zero_()
                target.weight[:rows] = source.weight
                target.bias[:rows] = source.bias
    x, z = torch.rand(5, D), torch.randn(4, 5, R)
    assert torch.allclose(full(x).log_prob(z), diag(x).log_prob(z), atol=1e-5)


def test_iaf_log_density_of_its_draw_matches_the_recomputed_inverse():
    """The cached inverse (draws) and the sequential inverse (any z) agree: change of variables."""
    enc = perturb(IAFEncoder(D, R, num_steps=2, flow_hidden=8, hidden=[8]))
    q = enc(torch.rand(5, D))
    z = q.rsample()
    cached = q.log_prob(z)
    recomputed = q.log_prob(z.clone())
    assert torch.allclose(cached, recomputed, atol=1e-4)


def test_iaf_one_step_log_density_is_base_minus_log_scales():
    enc = perturb(IAFEncoder(D, R, num_steps=1, flow_hidden=8, hidden=[8]))
    x = torch.rand(5, D)
    q = enc(x)
    z = q.rsample()
    loc, log_var, context = enc.encode(x)
    base = dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)
    step = enc.steps[0].condition(context)
    z0 = step.inv(z)  # cached: the base draw
    mean, log_scale = step.arn(z0)
    log_scale = log_scale.clamp(step.log_scale_min_clip, step.log_scale_max_clip)
    assert torch.allclose(z, mean + log_scale.exp() * z0, atol=1e-5)
    assert torch.allclose(q.log_prob(z), base.log_prob(z0) - log_scale.sum(-1), atol=1e-5)
    assert log_scale.abs().min() > 0  # a real affine step, not the identity it starts as


def test_iaf_guide_starts_as_its_gaussian_base():
    enc = IAFEncoder(D, R, num_steps=2, flow_hidden=8, hidden=[8])
    x, z = torch.rand(5, D), torch.randn(3, 5, R)
    loc, log_var, _ = enc.encode(x)
    base = dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)
    assert torch.allclose(enc(x).log_prob(z), base.log_prob(z), atol=1e-5)


def test_iaf_inverse_stays_finite_when_the_network_saturates():
    """A VampPrior evaluates the guide at codes it did not draw: the sequential inverse must not
    blow up even when the autoregressive network asks for tiny scales."""
    enc = IAFEncoder(D, R, num_steps=2, flow_hidden=8, hidden=[8])
    with torch.no_grad():
        for step in enc.steps:
            last = step.nn.layers[-1]
            last.weight.zero_()
            last.bias.fill_(-50.0)
    q = enc(torch.rand(5, D))
    log_q = q.log_prob(torch.randn(3, 5, R))
    assert torch.isfinite(log_q).all()


@pytest.mark.parametrize("name", ["diagonal", "lowrank", "full", "iaf"])
def test_guide_density_normalizes_on_a_2d_grid(name):
    config = TrainConfig.from_flat(dict(guide=name, latent_dim=2, hidden=[8], flow_hidden=8, guide_rank=1))
    enc = perturb(GUIDES[name](config.model, D, 0), 0.1)
    q = enc(torch.rand(1, D) * 0.1)  # near-zero inputs keep the density inside the grid
    mass = grid_mass(lambda z: q.log_prob(z.unsqueeze(1)).squeeze(1), lim=8.0)
    assert mass == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", ["diagonal", "lowrank", "full", "iaf"])
def test_guide_shapes_under_data_plate_and_particle_plate(name):
    config = TrainConfig.from_flat(dict(guide=name, latent_dim=R, hidden=[8], flow_hidden=8))
    vae = build_vae(config, D)
    x = torch.rand(5, D)
    with pyro.plate("particles", 4, dim=-2):
        trace = poutine.trace(vae.guide).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["z"]
    assert site["value"].shape == (4, 5, R)
    assert site["log_prob"].shape == (4, 5)
    assert torch.isfinite(site["log_prob"]).all()
    # particles are independent draws, not copies
    assert not torch.allclose(site["value"][0], site["value"][1])


@pytest.mark.parametrize("guide_name", ["lowrank", "full"])
@pytest.mark.parametrize("prior_name", ["normal", "learned-normal"])
def test_registered_kl_for_correlated_guides_matches_the_gaussian_closed_form(guide_name, prior_name):
    config = TrainConfig.from_flat(dict(prior=prior_name, guide=guide_name, latent_dim=R, hidden=[8]))
    vae = build_vae(config, D)
    perturb(vae.encoder)
    if prior_name == "learned-normal":
        with torch.no_grad():
            vae.prior.loc.normal_()
            vae.prior.log_scale.normal_(0, 0.3)
    x = torch.rand(5, D)
    q, p = vae.encoder(x), vae.prior(5)
    as_full = dist.MultivariateNormal(p.base_dist.loc, scale_tril=torch.diag_embed(p.base_dist.scale))
    q_full = dist.MultivariateNormal(q.loc, covariance_matrix=q.covariance_matrix)
    expected = kl_divergence(q_full, as_full)
    assert torch.allclose(kl_divergence(q, p), expected, atol=1e-4)
    assert (expected > 0).all()


def test_kl_to_diagonal_of_a_diagonal_gaussian_is_the_textbook_formula():
    mu, sigma = torch.randn(4, R), torch.rand(4, R) + 0.5
    m, s = torch.randn(4, R), torch.rand(4, R) + 0.5
    entropy = dist.Normal(mu, sigma).entropy().sum(-1)
    textbook = (torch.log(s / sigma) + (sigma ** 2 + (mu - m) ** 2) / (2 * s ** 2) - 0.5).sum(-1)
    assert torch.allclose(gaussian_kl_to_diagonal(mu, sigma ** 2, entropy, m, s), textbook, atol=1e-5)


@pytest.mark.parametrize("guide_name, analytic", [("diagonal", True), ("lowrank", True), ("full", True),
                                                  ("iaf", False)])
def test_meanfield_report_for_each_guide_under_the_normal_prior(guide_name, analytic):
    vae = build_vae(TrainConfig.from_flat(dict(guide=guide_name, latent_dim=R, hidden=[8], flow_hidden=8)), D)
    assert analytic_kl_sites(vae.model, vae.guide, torch.rand(2, D)) == {"z": analytic}


def test_meanfield_with_full_covariance_guide_uses_the_analytic_kl():
    """TraceMeanField's loss with a zero-variance reconstruction is exactly the closed-form KL term."""
    vae = build_vae(TrainConfig.from_flat(dict(guide="full", decoder="gaussian", latent_dim=R, hidden=[8])), D)
    x = torch.rand(5, D)
    elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=1)
    decoder_free = poutine.block(vae.model, hide=["x"])  # keep only the latent site
    loss = elbo.differentiable_loss(decoder_free, vae.guide, x)
    expected = kl_divergence(vae.encoder(x), vae.prior(5)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lowrank_rank_out_of_range_is_refused_with_the_value():
    with pytest.raises(ValueError, match="rank must be between 1 and latent_dim=3, got 4"):
        LowRankGaussianEncoder(D, R, rank=4)
    with pytest.raises(ValueError, match="guide_rank must be at most latent_dim=3, got 5"):
        TrainConfig.from_flat(dict(guide="lowrank", latent_dim=3, guide_rank=5)).validate()


def test_iaf_needs_enough_hidden_units():
    with pytest.raises(ValueError, match=r"flow_hidden must be at least latent_dim=20 .*got 8"):
        TrainConfig.from_flat(dict(guide="iaf", latent_dim=20, flow_hidden=8)).validate()
    assert math.isfinite(IAFEncoder(D, R, flow_hidden=R, hidden=[8])(torch.rand(2, D)).rsample().sum().item())
