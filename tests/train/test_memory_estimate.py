"""The memory a built-in model and its training step need is estimated from the sizes alone, and
every size enters the estimate: a request too large for the machine is refused by name before
anything is allocated, whichever part makes it large."""

from __future__ import annotations

import dataclasses

import pytest

from pyro_vae.cli.main import main
from pyro_vae.models.config import ModelConfig
from pyro_vae.models.registry import build_model
from pyro_vae.train.memory import model_parts, step_floats_per_pair

D, CLASSES, IMAGE = 64, 10, (8, 8)

#: Configurations in which one size makes the model large (a million parameters or so).
DOMINANT = {
    "hidden": dict(hidden=[1000, 1000]),
    "latent_dim": dict(latent_dim=3000, hidden=[16]),
    "guide_rank": dict(guide="lowrank", latent_dim=300, guide_rank=300, hidden=[16]),
    "full covariance": dict(guide="full", latent_dim=300, hidden=[16]),
    "iaf flow_hidden": dict(guide="iaf", latent_dim=100, flow_hidden=1000, hidden=[16]),
    "flow_steps": dict(guide="iaf", latent_dim=20, flow_hidden=200, flow_steps=50, hidden=[16]),
    "prior flow": dict(prior="flow", latent_dim=100, flow_hidden=2000, hidden=[16]),
    "mixture_components": dict(prior="mixture", mixture_components=20000, latent_dim=20, hidden=[16]),
    "pseudo_inputs": dict(prior="vamp", pseudo_inputs=20000, hidden=[16], latent_dim=2),
    "num_categories": dict(prior="categorical", guide="categorical", latent_dim=4, num_categories=20000,
                           hidden=[16]),
    "conv latent_dim": dict(network="conv", latent_dim=2000),
    "top_hidden": dict(stochastic_layers=2, top_hidden=[1000, 1000], latent_dim=4, hidden=[16]),
    "top_latent_dim": dict(stochastic_layers=2, top_latent_dim=5000, top_hidden=[16], latent_dim=4, hidden=[16]),
    "flow on z2": dict(stochastic_layers=2, prior="flow", top_latent_dim=200, flow_hidden=2000, latent_dim=4,
                       hidden=[16], top_hidden=[16]),
    "conditional": dict(conditional=True, latent_dim=3000, hidden=[16]),
}


@pytest.mark.parametrize("name", DOMINANT)
def test_the_model_estimate_is_within_a_factor_of_two_of_the_real_count(name):
    config = ModelConfig(**DOMINANT[name])
    real = sum(p.numel() for p in build_model(config, D, CLASSES, IMAGE).parameters())
    estimate = sum(model_parts(config, D, CLASSES, IMAGE).values())
    assert real / 2 <= estimate <= 2 * real, (name, real, estimate)


def test_every_size_enters_the_estimates():
    """Doubling any size of ModelConfig, with the parts that use it, grows the model or the step."""
    uses = {"latent_dim": {}, "hidden": {}, "mixture_components": dict(prior="mixture"),
            "pseudo_inputs": dict(prior="vamp"), "flow_steps": dict(prior="flow"),
            "flow_hidden": dict(guide="iaf"), "guide_rank": dict(guide="lowrank", latent_dim=40),
            "num_categories": dict(prior="categorical", guide="categorical"),
            "top_latent_dim": dict(stochastic_layers=2), "top_hidden": dict(stochastic_layers=2)}
    sizes = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("int", "list[int]")}
    assert sizes - {"stochastic_layers"} == set(uses)  # a new size must be added here, and to the estimates
    for name, parts in uses.items():
        config = ModelConfig(**parts)
        value = getattr(config, name)
        bigger = dataclasses.replace(config, **{name: [2 * h for h in value] if isinstance(value, list)
                                                 else 2 * value})
        before = (sum(model_parts(config, D, CLASSES, IMAGE).values()), step_floats_per_pair(config, D, IMAGE))
        after = (sum(model_parts(bigger, D, CLASSES, IMAGE).values()), step_floats_per_pair(bigger, D, IMAGE))
        assert after[0] > before[0] or after[1] > before[1], name


@pytest.mark.parametrize("flags,message", [
    (["--prior", "categorical", "--guide", "categorical", "--num-categories", "100000000"],
     "200000000 outputs for the categorical guide"),
    (["--prior", "categorical", "--guide", "categorical", "--num-categories", str(10**20)],
     "outputs for the categorical guide"),
    (["--guide", "lowrank", "--latent-dim", "40000", "--guide-rank", "40000"], "for the lowrank guide"),
    (["--stochastic-layers", "2", "--prior", "flow", "--top-latent-dim", "20", "--flow-hidden", "20",
      "--flow-steps", "100000000"], "prior flow_steps 100000000 x flow_hidden 20 x latent dim 20"),
    (["--prior", "mixture", "--mixture-components", "100000", "--latent-dim", "200", "--particles", "1000"],
     "one training step of particles 1000"),
])
def test_requests_too_large_for_any_part_are_refused_before_allocating(tmp_path, capsys, flags, message):
    argv = ["train", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress", *flags, "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "more than the" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_snr_refuses_a_k_that_cannot_fit(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "512",
                 "--no-progress", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["snr", str(run), "--objectives", "trace", "--particles", f"2,{10**14}", "--draws", "2",
                 "--no-progress"]) == 2
    assert "one gradient draw of K=100000000000000 particles" in capsys.readouterr().err
