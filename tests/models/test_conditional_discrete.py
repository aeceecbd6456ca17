"""Conditional VAE and discrete (relaxed categorical) latents: densities, temperature schedule
and clamping, the exact discrete model in eval mode, shapes, pairing rules, CLI flags, pictures."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae.cli.main import build_parser, config_from_args
from pyro_vae.infer.objectives import analytic_kl_sites, make_elbo
from pyro_vae.models.discrete import (
    MIN_TEMPERATURE,
    CategoricalLatentDecoder,
    RelaxedCategoricalEncoder,
    RelaxedCategoricalPrior,
    TemperatureSchedule,
    relaxed_one_hot,
)
from pyro_vae.models.registry import build_vae
from pyro_vae.train.config import TrainConfig

D, N, K = 6, 3, 4  # data features, categorical latents, categories


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def discrete_config(**kw) -> TrainConfig:
    return TrainConfig.from_flat(dict(prior="categorical", guide="categorical", latent_dim=N, num_categories=K, hidden=[8], **kw))


def concrete_log_density(x: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Maddison et al. 2017, Eq. (13): log Gamma(k) + (k-1) log tau + sum_i (log a_i - (tau+1) log x_i)
    - k log sum_i a_i x_i^-tau, with a = softmax(logits)."""
    k = x.shape[-1]
    log_a = logits.log_softmax(-1)
    return (math.lgamma(k) + (k - 1) * math.log(tau) + (log_a - (tau + 1) * x.log()).sum(-1)
            - k * torch.logsumexp(log_a - tau * x.log(), dim=-1))


def test_relaxed_density_matches_the_concrete_closed_form():
    logits = torch.randn(5, K)
    for tau in (0.5, 1.0, 2.0):
        q = relaxed_one_hot(logits, tau)
        x = q.rsample()
        assert torch.allclose(q.log_prob(x), concrete_log_density(x, logits, tau), atol=1e-3)


def test_relaxed_density_normalizes_for_two_categories():
    """With k = 2 the relaxation is a density of x_1 on (0, 1): integrate it numerically."""
    logits = torch.tensor([0.3, -0.4])
    q = relaxed_one_hot(logits, 0.8)
    t = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    points = torch.stack([t, 1 - t], -1).float()
    # density of x_1 on the line = simplex density / sqrt(2) * sqrt(2) (the chart x_1 -> (x_1, 1 - x_1))
    mass = torch.trapezoid(q.log_prob(points).double().exp(), t).item()
    assert mass == pytest.approx(1.0, abs=5e-3)


def test_cold_temperatures_are_clamped_and_keep_the_log_density_finite():
    """pyro issue #3304: a cold relaxation underflows to exact zeros and a nan log-density."""
    logits = torch.randn(2000, 10) * 3
    raw = dist.RelaxedOneHotCategorical(torch.tensor(0.01), logits=logits, validate_args=False)
    assert not torch.isfinite(raw.log_prob(raw.rsample())).all()  # the failure being guarded against
    for straight_through in (False, True):
        q = relaxed_one_hot(logits, 0.01, straight_through)
        assert float(q.temperature) == pytest.approx(MIN_TEMPERATURE)
        x = q.rsample()
        assert torch.isfinite(q.log_prob(x)).all()
    assert TemperatureSchedule(1.0, 0.5, 100.0).at(10_000, 10) == 0.5
    with pytest.warns(UserWarning, match="clamped"):
        cold = TemperatureSchedule(1.0, 0.01, 1.0)
    assert cold.at(10_000, 1) == MIN_TEMPERATURE
    with pytest.raises(ValueError, match=r"temperature_min must be >= 0.1.*got 0.05"):
        TrainConfig.from_flat(dict(temperature_min=0.05)).validate()


def test_temperature_anneals_exponentially_per_epoch_down_to_the_minimum():
    schedule = TemperatureSchedule(initial=2.0, minimum=0.5, rate=0.5)
    assert schedule.at(0, 10) == 2.0
    assert schedule.at(10, 10) == pytest.approx(2.0 * math.exp(-0.5))
    assert schedule.at(25, 10) == pytest.approx(2.0 * math.exp(-1.25))
    assert schedule.at(1000, 10) == 0.5
    vae = build_vae(discrete_config(temperature=2.0, temperature_min=0.5, temperature_anneal=0.5), D)
    vae.set_progress(10, 10)  # the trainer's hook reaches prior and guide
    assert vae.prior.temperature == vae.encoder.temperature == pytest.approx(2.0 * math.exp(-0.5))
    vae.train()
    assert float(vae.encoder(torch.rand(2, D)).base_dist.temperature) == pytest.approx(2.0 * math.exp(-0.5))
    with pytest.raises(ValueError, match="temperature must be >= temperature_min=0.5, got 0.3"):
        TrainConfig.from_flat(dict(temperature=0.3, temperature_min=0.5)).validate()


@pytest.mark.parametrize("straight_through", [False, True])
def test_training_mode_is_relaxed_and_eval_mode_is_the_exact_discrete_model(straight_through):
    vae = build_vae(discrete_config(straight_through=straight_through), D)
    x = torch.rand(5, D)
    vae.train()
    q = vae.encoder(x)
    z = q.rsample()
    assert z.shape == (5, N, K) and q.event_shape == (N, K) and q.batch_shape == (5,)
    is_one_hot = bool(((z == 0) | (z == 1)).all())
    assert is_one_hot == straight_through  # the relaxed draw is interior unless straight-through
    assert torch.allclose(z.sum(-1), torch.ones(5, N), atol=1e-5)
    vae.eval()
    q, p = vae.encoder(x), vae.prior(5)
    z = q.sample()
    assert ((z == 0) | (z == 1)).all() and torch.equal(z.sum(-1), torch.ones(5, N))
    exact = dist.OneHotCategorical(logits=vae.encoder.logits(x)).to_event(1)
    assert torch.allclose(q.log_prob(z), exact.log_prob(z))
    assert torch.allclose(p.log_prob(z), torch.full((5,), -N * math.log(K)))
    assert analytic_kl_sites(vae.model, vae.guide, x[:2]) == {"z": True}  # discrete KL is closed form
    vae.train()
    assert analytic_kl_sites(vae.model, vae.guide, x[:2]) == {"z": False}  # none for the relaxation


def test_straight_through_draw_passes_relaxed_gradients_to_the_encoder():
    enc = RelaxedCategoricalEncoder(D, N, K, hidden=[8], straight_through=True)
    q = enc(torch.rand(5, D))
    z = q.rsample()
    (z * torch.randn(K)).sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert torch.isfinite(q.log_prob(z)).all()  # scored at the relaxed draw, not at the one-hot


@pytest.mark.parametrize("objective", ["trace", "meanfield", "iwae", "renyi"])
def test_discrete_vae_shapes_under_particles_and_every_objective_in_both_modes(objective):
    vae = build_vae(discrete_config(), D)
    x = torch.rand(5, D).round()
    with pyro.plate("particles", 3, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    assert guide_trace.nodes["z"]["value"].shape == (3, 5, N, K)
    assert model_trace.nodes["x"]["log_prob"].shape == (3, 5)
    elbo = make_elbo(objective, alpha=0.5 if objective == "renyi" else None)
    for training in (True, False):
        vae.train(training)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        assert torch.isfinite(loss)


def test_categorical_latent_decoder_flattens_the_one_hot_codes():
    vae = build_vae(discrete_config(), D)
    assert isinstance(vae.decoder, CategoricalLatentDecoder)
    assert vae.latent_dim == N * K
    z = torch.nn.functional.one_hot(torch.randint(K, (2, 5, N)), K).float()
    flat = vae.decoder.decoder(z.reshape(2, 5, N * K)).base_dist.logits
    assert torch.equal(vae.decoder(z).base_dist.logits, flat)
    assert vae.sample(3).shape == (3, D)
    assert vae.reconstruct(torch.rand(4, D)).shape == (4, D)


def test_discrete_prior_and_guide_only_pair_with_each_other():
    with pytest.raises(ValueError, match="prior 'categorical' and guide 'diagonal' do not fit"):
        build_vae(TrainConfig.from_flat(dict(prior="categorical", guide="diagonal")), D)
    with pytest.raises(ValueError, match="prior 'normal' and guide 'categorical' do not fit"):
        build_vae(TrainConfig.from_flat(dict(prior="normal", guide="categorical")), D)
    with pytest.raises(ValueError, match="num_categories must be an integer >= 2, got 1"):
        TrainConfig.from_flat(dict(num_categories=1)).validate()
    with pytest.raises(ValueError, match="need num_latents >= 1 and num_categories >= 2"):
        RelaxedCategoricalPrior(N, 1)


def test_conditional_vae_feeds_the_label_to_guide_and_decoder():
    vae = build_vae(TrainConfig.from_flat(dict(latent_dim=2, hidden=[8], conditional=True)), D, num_classes=3)
    x = torch.rand(4, D)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    c0, c1 = vae.condition(y0), vae.condition(y1)
    assert not torch.allclose(vae.encoder(x, c0).mean, vae.encoder(x, c1).mean)
    z = torch.zeros(4, 2)
    assert not torch.allclose(vae.decoder.mean(z, c0), vae.decoder.mean(z, c1))
    with pytest.raises(ValueError, match="pass labels y"):
        vae.model(x)
    with pytest.raises(ValueError, match="--conditional needs a labelled data set"):
        build_vae(TrainConfig.from_flat(dict(conditional=True)), D, num_classes=None)


def test_cli_flags_select_each_part_and_its_options():
    args = build_parser().parse_args([
        "train", "--prior", "categorical", "--guide", "categorical", "--decoder", "continuous-bernoulli",
        "--num-categories", "5", "--temperature", "2.0", "--temperature-min", "0.3",
        "--temperature-anneal", "0.2", "--straight-through", "--mixture-components", "7",
        "--pseudo-inputs", "9", "--flow-steps", "3", "--flow-hidden", "32", "--guide-rank", "4"])
    config = config_from_args(args)
    assert (config.model.prior, config.model.guide, config.model.decoder) == ("categorical", "categorical", "continuous-bernoulli")
    assert (config.model.num_categories, config.model.temperature, config.model.temperature_min) == (5, 2.0, 0.3)
    assert (config.model.temperature_anneal, config.model.straight_through) == (0.2, True)
    assert (config.model.mixture_components, config.model.pseudo_inputs, config.model.flow_steps) == (7, 9, 3)
    assert (config.model.flow_hidden, config.model.guide_rank) == (32, 4)
    defaults = config_from_args(build_parser().parse_args(["train"]))
    assert defaults == TrainConfig()  # unset flags stay absent, so TOML files can supply them
    for prior in ("normal", "learned-normal", "mixture", "vamp", "flow", "categorical"):
        assert config_from_args(build_parser().parse_args(["train", "--prior", prior])).model.prior == prior
    for guide in ("diagonal", "lowrank", "full", "iaf", "categorical"):
        assert config_from_args(build_parser().parse_args(["train", "--guide", guide])).model.guide == guide


def test_conditional_run_writes_one_row_of_samples_per_class(tmp_path):
    from pyro_vae.data import load_dataset
    from pyro_vae.evaluation.pictures import write_run_pictures
    from pyro_vae.train.trainer import train

    config = TrainConfig.from_flat(dict(data="digits", latent_dim=2, hidden=[16], conditional=True, epochs=1,
                         run_dir=str(tmp_path / "cvae"), progress=False))
    result = train(config, dataset=load_dataset("digits"))
    paths = write_run_pictures(result.run_dir, num=20)
    assert [p.name for p in paths] == ["samples.png", "reconstructions.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    y = torch.arange(10).repeat_interleave(2)
    samples = result.module.sample(20, y)
    assert samples.shape == (20, 64)
    assert not torch.allclose(samples[0], samples[2])  # rows of different classes differ

