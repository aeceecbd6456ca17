"""Priors p(z): log-densities against closed forms or numeric normalization, shapes under
plates and particles, state and devices, and what ``meanfield`` computes for each."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro import poutine

from pyro_vae.infer.objectives import analytic_kl_sites
from pyro_vae.models.flows import FlowPrior, IAFEncoder
from pyro_vae.models.guides import DiagonalGaussianEncoder
from pyro_vae.models.priors import (
    LearnedNormalPrior,
    MixtureOfGaussiansPrior,
    VampPrior,
)
from pyro_vae.models.registry import PRIORS, build_vae
from pyro_vae.train.config import TrainConfig

from conftest import grid_mass, perturb

D, R = 6, 3


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def small_config(prior: str, **kw) -> TrainConfig:
    return TrainConfig.from_flat(dict(prior=prior, latent_dim=kw.pop("latent_dim", R), hidden=[8], flow_hidden=8,
                       pseudo_inputs=5, mixture_components=4, **kw))


def test_learned_normal_matches_the_gaussian_closed_form():
    prior = LearnedNormalPrior(R)
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        prior.log_scale.copy_(torch.tensor([0.0, math.log(2.0), math.log(0.5)]))
    z = torch.randn(4, R)
    s = torch.tensor([1.0, 2.0, 0.5])
    closed = (-0.5 * ((z - prior.loc) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(prior(4).log_prob(z), closed, atol=1e-5)


def test_mixture_log_density_is_the_logsumexp_over_components():
    prior = MixtureOfGaussiansPrior(R, num_components=4)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        prior.log_scales.normal_(0, 0.3)
    z = torch.randn(5, R)
    log_w = prior.logits.log_softmax(-1)
    per_component = torch.stack([dist.Normal(prior.locs[c], prior.log_scales[c].exp()).log_prob(z).sum(-1)
                                 for c in range(4)], dim=-1)
    assert torch.allclose(prior(5).log_prob(z), torch.logsumexp(per_component + log_w, -1), atol=1e-5)


def test_vamp_prior_is_the_average_of_the_guide_at_the_pseudo_inputs():
    encoder = DiagonalGaussianEncoder(D, R, hidden=[8])
    prior = VampPrior(encoder, D, num_pseudo_inputs=5)
    z = torch.randn(4, R)
    manual = torch.stack([encoder(prior.pseudo_inputs[k:k + 1]).log_prob(z) for k in range(5)], -1)
    expected = torch.logsumexp(manual, -1) - math.log(5)
    assert torch.allclose(prior(4).log_prob(z), expected, atol=1e-5)


def test_vamp_prior_with_an_iaf_guide_evaluates_each_flow_component():
    """Flow components condition on one context per pseudo-input: the mixture must broadcast the
    value against the components (plain MixtureSameFamily fails here)."""
    encoder = perturb(IAFEncoder(D, R, num_steps=2, flow_hidden=8, hidden=[8]))
    prior = VampPrior(encoder, D, num_pseudo_inputs=3)
    z = torch.randn(2, 4, R)  # (particles, batch, r)
    manual = torch.stack([encoder(prior.pseudo_inputs[k:k + 1]).log_prob(z.unsqueeze(-2)).squeeze(-1)
                          for k in range(3)], -1)
    expected = torch.logsumexp(manual, -1) - math.log(3)
    got = prior(4).expand([2, 4]).log_prob(z)
    assert got.shape == (2, 4)
    assert torch.allclose(got, expected, atol=1e-4)


def test_vamp_prior_holds_pseudo_inputs_but_not_a_second_copy_of_the_encoder():
    vae = build_vae(small_config("vamp"), D)
    keys = list(vae.state_dict())
    assert "prior.pseudo_inputs" in keys
    assert not any(k.startswith("prior.encoder") or k.startswith("prior._encoder") for k in keys)
    assert vae.prior.encoder is vae.encoder
    u = vae.prior.pseudo_inputs.detach()
    assert 0.0 <= float(u.min()) and float(u.max()) <= 1.0


def test_conditional_vamp_prior_learns_pseudo_labels_and_ignores_y():
    vae = build_vae(small_config("vamp", conditional=True), D, num_classes=3)
    assert vae.prior.pseudo_label_logits.shape == (5, 3)
    z = torch.randn(4, R)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    assert torch.equal(vae.prior(4, y).log_prob(z), vae.prior(4, None).log_prob(z))


def test_flow_prior_log_density_is_the_change_of_variables():
    """z = f1^-1(f2^-1(u)), so u = f1(f2(z)) and log p(z) = log N(u) + sum of the forward log-dets."""
    prior = FlowPrior(R, num_steps=2, hidden=8)
    z = torch.randn(5, R)
    standard = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(prior(5).log_prob(z), standard, atol=1e-6)  # starts as N(0, I)
    perturb(prior)
    u, log_det = z, torch.zeros(5)
    for step in reversed([T.AffineAutoregressive(network) for network in prior.networks]):
        u_next = step(u)
        log_det = log_det + step.log_abs_det_jacobian(u, u_next)
        u = u_next
    expected = dist.Normal(0.0, 1.0).log_prob(u).sum(-1) + log_det
    assert torch.allclose(prior(5).log_prob(z), expected, atol=1e-4)
    assert not torch.allclose(prior(5).log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1), atol=1e-2)


def test_flow_prior_density_follows_its_parameters_at_the_same_value():
    """No stale transform cache: the same z tensor is re-evaluated after the networks change."""
    prior = FlowPrior(R, num_steps=2, hidden=8)
    z = torch.randn(5, R)
    before = prior(5).log_prob(z)
    perturb(prior)
    after = prior(5).log_prob(z)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, prior(5).log_prob(z.clone()))


@pytest.mark.parametrize("name", ["normal", "learned-normal", "mixture", "vamp", "flow"])
def test_prior_density_normalizes_on_a_2d_grid(name):
    config = small_config(name, latent_dim=2)
    encoder = DiagonalGaussianEncoder(D, 2, hidden=[8])
    prior = perturb(PRIORS[name](config.model, D, 0, encoder), 0.1)  # learnable parts off their initialisation
    mass = grid_mass(lambda z: prior(z.shape[0]).log_prob(z), lim=8.0)
    assert mass == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", ["normal", "learned-normal", "mixture", "vamp", "flow"])
def test_prior_shapes_under_data_plate_and_particle_plate(name):
    vae = build_vae(small_config(name), D)
    x = torch.rand(5, D)
    with pyro.plate("particles", 4, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    assert model_trace.nodes["z"]["log_prob"].shape == (4, 5)
    assert torch.isfinite(model_trace.nodes["z"]["log_prob"]).all()
    draws = vae.prior(5).sample()
    assert draws.shape == (5, R)
    assert vae.sample(3).shape == (3, D)


@pytest.mark.parametrize("name", ["learned-normal", "mixture", "vamp", "flow"])
def test_learnable_prior_gets_gradients_and_survives_a_state_dict_round_trip(name):
    config = small_config(name)
    vae = build_vae(config, D)
    x = torch.rand(5, D)
    z = torch.randn(5, R)
    perturb(vae.prior)  # flows start at the identity, where inner layers get no gradient yet
    own = [p for n, p in vae.prior.named_parameters()]
    assert own, f"{name} prior has no parameters"
    vae.prior(5).log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    pyro.set_rng_seed(1)
    again = build_vae(config, D)
    again.load_state_dict(vae.state_dict())
    assert torch.allclose(again.prior(5).log_prob(z), vae.prior(5).log_prob(z))
    assert torch.allclose(again.encoder(x).log_prob(z), vae.encoder(x).log_prob(z))


@pytest.mark.parametrize("name, analytic", [("normal", True), ("learned-normal", True), ("mixture", False),
                                            ("vamp", False), ("flow", False)])
def test_meanfield_report_for_each_prior_under_the_diagonal_guide(name, analytic):
    vae = build_vae(small_config(name), D)
    assert analytic_kl_sites(vae.model, vae.guide, torch.rand(2, D)) == {"z": analytic}


def test_trainer_warns_when_meanfield_falls_back_to_monte_carlo(tmp_path):
    from pyro_vae.data import load_dataset
    from pyro_vae.train.trainer import Trainer

    digits = load_dataset("digits")
    config = small_config("mixture", objective="meanfield", epochs=1, run_dir=str(tmp_path / "run"),
                          progress=False)
    with pytest.warns(UserWarning, match="no analytic KL registered for site\\(s\\) z"):
        trainer = Trainer(config, dataset=digits)
    assert trainer.analytic_kl == {"z": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the analytic pair must not warn
        Trainer(small_config("learned-normal", objective="meanfield", epochs=1, run_dir=str(tmp_path / "b"),
                             progress=False), dataset=digits)


def test_bad_sizes_are_refused_with_the_value():
    with pytest.raises(ValueError, match="num_components must be a positive integer, got 0"):
        MixtureOfGaussiansPrior(R, 0)
    with pytest.raises(ValueError, match="num_pseudo_inputs must be a positive integer, got 0"):
        VampPrior(DiagonalGaussianEncoder(D, R), D, 0)
    with pytest.raises(ValueError, match="mixture_components must be a positive integer, got 0"):
        TrainConfig.from_flat(dict(mixture_components=0)).validate()
    with pytest.raises(ValueError, match="flow_steps must be a positive integer, got 0"):
        TrainConfig.from_flat(dict(flow_steps=0)).validate()
