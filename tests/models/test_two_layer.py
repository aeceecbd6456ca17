"""The two-stochastic-layer VAE (Burda, Grosse & Salakhutdinov 2016): the paper's architecture,
site shapes with and without vectorized particles, finite differentiable bounds, training on
digits, and the option combinations it refuses."""

import pyro
import pytest
import torch
from conftest import fresh
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.infer.objectives import make_elbo
from pyro_vae.models.config import ModelConfig
from pyro_vae.models.registry import build_model, build_vae
from pyro_vae.models.two_layer import TwoLayerVAE

D, Z1, Z2, B, P = 10, 6, 3, 5, 4
SMALL = dict(stochastic_layers=2, latent_dim=Z1, top_latent_dim=Z2, hidden=[16], top_hidden=[8])


@pytest.fixture(autouse=True)
def seeded():
    fresh(0)


def small(**overrides) -> TwoLayerVAE:
    return build_model(ModelConfig(**{**SMALL, **overrides}), D, num_classes=3 if overrides.get("conditional")
                       else None)


def linear_sizes(net: nn.Module) -> list[int]:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def test_the_paper_architecture_from_the_config():
    config = ModelConfig(stochastic_layers=2, latent_dim=100, hidden=[200, 200], activation="tanh")
    model = build_model(config, 784)
    assert isinstance(model, TwoLayerVAE) and model.latent_sites == ("z1", "z2")
    assert (config.top_latent_dim, config.top_hidden) == (50, [100, 100])  # the paper's defaults
    assert linear_sizes(model.encoder_z1.net) == [784, 200, 200, 2 * 100]  # q(z1 | x)
    assert linear_sizes(model.encoder_z2.net) == [100, 100, 100, 2 * 50]  # q(z2 | z1)
    assert linear_sizes(model.prior_z1.net) == [50, 100, 100, 2 * 100]  # p(z1 | z2)
    assert linear_sizes(model.decoder.net) == [100, 200, 200, 784]  # p(x | z1)
    activations = {type(m) for m in model.modules() if not isinstance(m, (nn.Linear, nn.Sequential))}
    assert nn.Tanh in activations and nn.ReLU not in activations
    assert (model.latent_dim, model.top_latent_dim) == (100, 50)
    assert model.prior_z2(7).batch_shape == (7,) and model.prior_z2(7).event_shape == (50,)


def traces(model, x, particles=None):
    def run():
        guide_trace = poutine.trace(model.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
        return guide_trace, model_trace

    if particles is None:
        guide_trace, model_trace = run()
    else:
        with pyro.plate("particles", particles, dim=-2):
            guide_trace, model_trace = run()
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return guide_trace, model_trace


@pytest.mark.parametrize("particles", [None, P])
def test_sites_and_shapes_with_and_without_a_particle_plate(particles):
    model = small()
    x = torch.rand(B, D).round()
    guide_trace, model_trace = traces(model, x, particles)
    lead = (B,) if particles is None else (P, B)
    sizes = {"z1": Z1, "z2": Z2}
    guide_sites = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    model_sites = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
    assert guide_sites == ["z1", "z2"] and model_sites == ["z2", "z1", "x"]
    for trace in (guide_trace, model_trace):
        for name, size in sizes.items():
            site = trace.nodes[name]
            assert site["value"].shape == (*lead, size)
            # the replayed model site keeps the prior's (B,) batch; its log-density broadcasts to (P, B)
            assert site["fn"].event_shape == (size,) and torch.broadcast_shapes(site["fn"].batch_shape, lead) == lead
            assert site["log_prob"].shape == lead
            assert [f.name for f in site["cond_indep_stack"] if f.name == "data"] == ["data"]
    observed = model_trace.nodes["x"]
    assert observed["is_observed"] and observed["fn"].batch_shape == lead and observed["fn"].event_shape == (D,)
    assert observed["log_prob"].shape == lead
    assert model_trace.nodes["z1"]["value"] is guide_trace.nodes["z1"]["value"]


def test_the_bound_is_the_two_layer_importance_weight():
    """log w = log p(x | z1) + log p(z1 | z2) + log p(z2) - log q(z1 | x) - log q(z2 | z1), per point."""
    model = small()
    x = torch.rand(B, D).round()
    guide_trace, model_trace = traces(model, x, P)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z2"]["value"]
    by_hand = (model.decoder(z1).log_prob(x) + model.prior_z1(z2).log_prob(z1) + model.prior_z2(B).log_prob(z2)
               - model.encoder_z1(x).log_prob(z1) - model.encoder_z2(z1).log_prob(z2))
    traced = sum(model_trace.nodes[n]["log_prob"] for n in ("x", "z1", "z2")) \
        - sum(guide_trace.nodes[n]["log_prob"] for n in ("z1", "z2"))
    assert torch.allclose(traced, by_hand, atol=1e-5)


@pytest.mark.parametrize("objective", ["trace", "iwae"])
def test_the_bound_is_finite_and_differentiable(objective):
    model = small()
    x = torch.rand(B, D).round()
    elbo = Trace_ELBO() if objective == "trace" else make_elbo("iwae", num_particles=P)
    loss = elbo.differentiable_loss(model.model, model.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("overrides", [dict(prior="learned-normal"), dict(prior="mixture", mixture_components=3),
                                       dict(prior="flow", flow_hidden=8, guide="iaf"), dict(guide="lowrank"),
                                       dict(guide="full", decoder="gaussian"), dict(conditional=True)],
                         ids=["learned-normal", "mixture", "flow-iaf", "lowrank", "full-gaussian", "conditional"])
def test_other_priors_guides_decoders_and_labels_work_with_two_layers(overrides):
    model = small(**overrides)
    x = torch.rand(B, D).round()
    y = torch.tensor([0, 1, 2, 0, 1]) if overrides.get("conditional") else None
    loss = make_elbo("iwae", num_particles=P).differentiable_loss(model.model, model.guide, x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.sample(4, None if y is None else y[:4]).shape == (4, D)
    assert model.reconstruct(x, y).shape == (B, D)
    if y is not None:
        c0, c1 = model.condition(torch.zeros(B, dtype=torch.long)), model.condition(torch.ones(B, dtype=torch.long))
        z2 = torch.zeros(B, Z2)
        assert not torch.allclose(model.prior_z1(z2, c0).mean, model.prior_z1(z2, c1).mean)


def test_refused_combinations_name_the_option():
    with pytest.raises(ValueError, match="--prior vamp does not work with --stochastic-layers 2: the VampPrior"):
        ModelConfig(**SMALL, prior="vamp").validate()
    with pytest.raises(ValueError, match="--prior categorical does not work with --stochastic-layers 2"):
        ModelConfig(**SMALL, prior="categorical", guide="categorical").validate()
    with pytest.raises(ValueError, match="stochastic_layers must be 1 or 2, got 3"):
        ModelConfig(stochastic_layers=3).validate()
    with pytest.raises(ValueError, match="top_hidden sizes must be a list of positive integers, got \\[0\\]"):
        ModelConfig(**{**SMALL, "top_hidden": [0]}).validate()
    with pytest.raises(ValueError, match="flow_hidden must be at least top_latent_dim=50"):
        ModelConfig(stochastic_layers=2, latent_dim=8, prior="flow", flow_hidden=16).validate()
    ModelConfig(stochastic_layers=2, latent_dim=8, prior="flow", flow_hidden=64).validate()
    with pytest.raises(ValueError, match="build_vae builds one stochastic layer.*use build_model"):
        build_vae(ModelConfig(**SMALL), D)
    assert "stochastic_layers" in ModelConfig.field_names() and "top_hidden" in ModelConfig.field_names()


def held_out_elbo(model, x, particles=20) -> float:
    with torch.no_grad():
        loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        return -loss.loss(model.model, model.guide, x) / x.shape[0]


def test_a_few_adam_steps_on_digits_raise_the_elbo(digits, cpu_threads):
    torch.set_num_threads(1)  # small networks: threads only contend
    torch.manual_seed(0)
    model = build_model(ModelConfig(stochastic_layers=2, latent_dim=8, top_latent_dim=4, hidden=[64],
                                    top_hidden=[32], activation="tanh"), digits.num_features)
    x_train, x_test = digits.train, digits.test[:200]
    before = held_out_elbo(model, x_test)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    elbo = Trace_ELBO(max_plate_nesting=1)
    for step in range(150):
        batch = x_train[torch.randint(len(x_train), (64,))]
        optimizer.zero_grad()
        (elbo.differentiable_loss(model.model, model.guide, batch) / 64).backward()
        optimizer.step()
    after = held_out_elbo(model, x_test)
    assert after > before + 10, (before, after)
