"""pyro_vae.infer.weights: per-point importance log-weights of any model/guide pair."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussianProblem
from pyro import poutine
from torch import nn

from pyro_vae.infer.bounds import iwae_bound
from pyro_vae.infer.scale import latent_scale
from pyro_vae.infer.weights import log_weights, plate_nesting, trace_pair
from pyro_vae.models.registry import build_vae
from pyro_vae.train.config import TrainConfig

D, R, B = 6, 3, 5


def small_vae(**overrides):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    config = TrainConfig.from_flat(dict(latent_dim=R, hidden=[8], mixture_components=2, **overrides))
    return build_vae(config, D, 3 if overrides.get("conditional") else None)


def data(n=B):
    return torch.bernoulli(torch.full((n, D), 0.4), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [{}, {"conditional": True}, {"prior": "mixture"}, {"guide": "full"}],
                         ids=["fast-parts", "conditional", "mixture-prior", "full-guide"])
def test_equal_to_the_evaluators_traced_weights_on_the_builtin_vae(overrides):
    """The evaluator's trace-based weights: the guide traced under a particle plate at dim -2,
    the model replayed, each site's log-density per (particle, point)."""
    vae, x = small_vae(**overrides), data()
    y = torch.arange(B) % 3 if vae.num_classes else None
    for k in (1, 4):
        pyro.set_rng_seed(2)
        with torch.no_grad(), pyro.plate("particles", k, dim=-2):
            guide_trace = poutine.trace(vae.guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, y)
        recon = model_trace.nodes["x"]["fn"].log_prob(x)
        z = guide_trace.nodes["z"]["value"]
        log_p, log_q = model_trace.nodes["z"]["fn"].log_prob(z), guide_trace.nodes["z"]["fn"].log_prob(z)
        expected = (log_p + recon - log_q, recon, log_p - log_q)  # Pyro's order: model sites, then guide
        pyro.set_rng_seed(2)
        with torch.no_grad():
            got = log_weights(vae.model, vae.guide, x, y, num_particles=k)
        for g, e in zip(got[:3], expected, strict=True):
            assert g.shape == (k, B) and torch.equal(g, e)
        assert list(got.sites) == ["z"] and torch.equal(got.sites["z"], got.latent)


class TwoLatents(nn.Module):
    """z1 ~ N(0, I), z2 | z1 ~ N(A z1, I), x | z2 ~ Bernoulli(W z2); the guide draws z1 then z2."""

    def __init__(self):
        super().__init__()
        self.A = nn.Linear(2, 2)
        self.W = nn.Linear(2, D)
        self.enc1 = nn.Linear(D, 4)
        self.enc2 = nn.Linear(D + 2, 4)


def two_latent_program(net):
    def model(x):
        pyro.module("net", net)
        with pyro.plate("points", x.shape[0]):
            h = pyro.sample("h", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            u = pyro.sample("u", dist.Normal(net.A(h), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=net.W(u)).to_event(1), obs=x)

    def guide(x):
        pyro.module("net", net)
        with pyro.plate("points", x.shape[0]):
            loc, log_scale = net.enc1(x).chunk(2, -1)
            h = pyro.sample("h", dist.Normal(loc, log_scale.exp()).to_event(1))
            loc, log_scale = net.enc2(torch.cat([x.expand(*h.shape[:-1], D), h], -1)).chunk(2, -1)
            pyro.sample("u", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide


def test_a_two_latent_plain_function_program_with_free_site_names():
    torch.manual_seed(0)
    model, guide = two_latent_program(TwoLatents())
    x = data()
    pyro.set_rng_seed(3)
    got = log_weights(model, guide, x, num_particles=7, data_plate="points")
    pyro.set_rng_seed(3)
    guide_trace, model_trace = trace_pair(model, guide, x, num_particles=7)
    assert model_trace.nodes["h"]["value"].shape == (7, B, 2)
    # by hand, site by site, from the same draws
    h, u = guide_trace.nodes["h"]["value"], guide_trace.nodes["u"]["value"]
    q_h, q_u = guide_trace.nodes["h"]["fn"], guide_trace.nodes["u"]["fn"]
    p_h, p_u, p_x = (model_trace.nodes[s]["fn"] for s in ("h", "u", "obs"))
    sites = {"h": p_h.log_prob(h) - q_h.log_prob(h), "u": p_u.log_prob(u) - q_u.log_prob(u)}
    recon = p_x.log_prob(x)
    assert set(got.sites) == {"h", "u"}
    for name in sites:
        assert torch.allclose(got.sites[name], sites[name], atol=1e-5)
    assert torch.allclose(got.reconstruction, recon, atol=1e-5)
    assert torch.allclose(got.log_weight, recon + sites["h"] + sites["u"], atol=1e-5)
    assert got.log_weight.requires_grad  # no gradients disabled inside


def test_extra_plates_inside_the_data_plate_are_summed():
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("pixels", x.shape[1], dim=-1):
                z = pyro.sample("w", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("w", dist.Normal(0.5 * x, 0.8))

    x = torch.randn(B, D)
    assert plate_nesting(model, guide, x) == 2
    pyro.set_rng_seed(0)
    got = log_weights(model, guide, x, num_particles=3)
    pyro.set_rng_seed(0)
    guide_trace, model_trace = trace_pair(model, guide, x, num_particles=3)
    assert guide_trace.nodes["w"]["value"].shape == (3, B, D)  # particle plate at dim -3
    w = guide_trace.nodes["w"]["value"]
    expected = (dist.Normal(0.0, 1.0).log_prob(w) + dist.Normal(w, 1.0).log_prob(x)
                - dist.Normal(0.5 * x, 0.8).log_prob(w)).sum(-1)
    assert got.log_weight.shape == (3, B) and torch.allclose(got.log_weight, expected, atol=1e-5)


def test_the_plate_nesting_guess_leaves_the_random_state_alone():
    torch.manual_seed(0)
    model, guide = two_latent_program(TwoLatents())
    x = data()
    torch.manual_seed(9)
    plate_nesting(model, guide, x)
    after = torch.rand(3)
    torch.manual_seed(9)
    assert torch.equal(after, torch.rand(3))


def test_the_iwae_bound_approaches_the_exact_evidence_of_the_linear_gaussian_model():
    problem = LinearGaussianProblem(n=32)
    vae = problem.vae("exact", narrow=0.6)  # a poor guide: the ELBO is well below log p(x)
    exact = problem.log_evidence()
    gaps = []
    pyro.set_rng_seed(0)
    with torch.no_grad():
        for k in (1, 10, 1000):
            lw = log_weights(vae.model, vae.guide, problem.x, num_particles=k).log_weight
            gaps.append(float((exact - iwae_bound(lw)).mean()))
    assert gaps[0] > gaps[1] > gaps[2] > -0.01
    assert gaps[0] > 0.2 and gaps[2] < 0.02


def test_the_exact_posterior_makes_every_weight_the_evidence():
    problem = LinearGaussianProblem(n=8)
    vae = problem.vae("exact")
    with torch.no_grad():
        lw = log_weights(vae.model, vae.guide, problem.x, num_particles=4).log_weight
    assert torch.allclose(lw, problem.log_evidence().expand(4, -1), atol=1e-8)


def test_latent_scale_around_the_call_scales_the_latent_part():
    vae, x = small_vae(prior="mixture"), data()
    pyro.set_rng_seed(1)
    plain = log_weights(vae.model, vae.guide, x, num_particles=2)
    pyro.set_rng_seed(1)
    with latent_scale(scale=0.3):
        scaled = log_weights(vae.model, vae.guide, x, num_particles=2)
    assert torch.allclose(scaled.latent, 0.3 * plain.latent, rtol=1e-5, atol=1e-5)
    assert torch.equal(scaled.reconstruction, plain.reconstruction)


def test_the_fast_parts_path_honours_a_latent_scale_too():
    vae, x = small_vae(), data()
    pyro.set_rng_seed(1)
    plain = log_weights(vae.model, vae.guide, x, num_particles=2)
    pyro.set_rng_seed(1)
    with latent_scale(scale=0.3):
        scaled = log_weights(vae.model, vae.guide, x, num_particles=2)
    assert torch.allclose(scaled.latent, 0.3 * plain.latent, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem():
    vae, x = small_vae(), data()
    with pytest.raises(ValueError, match="'z' is outside the plate 'batch'"):
        log_weights(vae.model, vae.guide, x, num_particles=2, data_plate="batch")
    with pytest.raises(ValueError, match="positive integer"):
        log_weights(vae.model, vae.guide, x, num_particles=0)

    def model(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.sample("g", dist.Normal(0.0, 2.0))

    with pytest.raises(ValueError, match="'g' is outside the plate 'data'"):
        log_weights(model, guide, x, num_particles=2)
