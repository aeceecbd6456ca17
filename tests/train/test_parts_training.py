"""Every part trains: a short run on the digits data improves the validation bound, and every
prior x guide combination takes finite steps with gradients reaching all of its parameters
under every objective."""

import itertools
import warnings

import pyro
import pytest
import torch

from pyro_vae.infer.objectives import OBJECTIVES, make_elbo
from pyro_vae.models.config import REFUSED_PAIRS
from pyro_vae.models.registry import build_vae
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.trainer import Trainer, evaluate_loss

CONTINUOUS_PRIORS = ("normal", "learned-normal", "mixture", "vamp", "flow")
CONTINUOUS_GUIDES = ("diagonal", "lowrank", "full", "iaf")
ALPHA = {"renyi": 0.5}



def tiny(**kw) -> TrainConfig:
    base = dict(data="digits", latent_dim=4, hidden=[32], flow_hidden=16, pseudo_inputs=10, mixture_components=5,
                num_categories=4, lr=1e-2, batch_size=128, epochs=2, patience=0, progress=False, seed=0)
    base.update(kw)
    if base.get("objective") == "renyi":
        base.setdefault("alpha", 0.5)
    return TrainConfig.from_flat(dict(**base))


def bound_before_and_after(config: TrainConfig, digits) -> tuple[float, float]:
    """Validation bound (the run's own objective, eval mode) at initialisation and after training."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meanfield's Monte Carlo fallback warning is tested elsewhere
        trainer = Trainer(config, dataset=digits)
    trainer.program.train(False)
    before = -evaluate_loss(trainer.loss_fn, trainer.program, trainer.x_valid, trainer.y_valid)
    result = trainer.fit()
    return before, result.history[-1]["valid_bound"]


PART_RUNS = {
    "prior learned-normal": dict(prior="learned-normal"),
    "prior mixture": dict(prior="mixture"),
    "prior vamp": dict(prior="vamp"),
    "prior flow": dict(prior="flow"),
    "guide lowrank": dict(guide="lowrank"),
    "guide full": dict(guide="full"),
    "guide iaf": dict(guide="iaf"),
    "decoder gaussian-pixel": dict(decoder="gaussian-pixel", sigma_x=0.3),
    "decoder continuous-bernoulli": dict(decoder="continuous-bernoulli"),
    "cvae": dict(conditional=True),
    "discrete relaxed": dict(prior="categorical", guide="categorical"),
    "discrete straight-through": dict(prior="categorical", guide="categorical", straight_through=True),
    "discrete relaxed iwae": dict(prior="categorical", guide="categorical", objective="iwae"),
    "vamp x lowrank meanfield (Monte Carlo KL)": dict(prior="vamp", guide="lowrank", objective="meanfield"),
    "flow x full renyi": dict(prior="flow", guide="full", objective="renyi"),
}


@pytest.mark.parametrize("name", list(PART_RUNS))
def test_short_training_improves_the_validation_bound(name, digits, tmp_path):
    pyro.clear_param_store()
    config = tiny(run_dir=str(tmp_path / "run"), **PART_RUNS[name])
    before, after = bound_before_and_after(config, digits)
    assert after > before + 3.0, f"{name}: bound {before:.2f} -> {after:.2f} nats"


@pytest.mark.parametrize("prior, guide, objective",
                         [(p, g, o) for p, g, o in itertools.product(CONTINUOUS_PRIORS, CONTINUOUS_GUIDES, OBJECTIVES)
                          if (p, g) not in REFUSED_PAIRS])
def test_every_combination_steps_under_every_objective(prior, guide, objective, digits):
    """Two Adam steps: finite losses, and every parameter moves (flows start at the identity, so
    their inner layers only get gradients from the second step on)."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    config = tiny(prior=prior, guide=guide, latent_dim=2, hidden=[8], flow_hidden=4, pseudo_inputs=3)
    vae = build_vae(config, digits.num_features)
    elbo = make_elbo(objective, 2 if objective in ("iwae", "renyi") else None, ALPHA.get(objective))
    x = digits.train[:16]
    start = {n: p.detach().clone() for n, p in vae.named_parameters()}
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(2):
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = [n for n, p in vae.named_parameters() if torch.equal(p, start[n])]
    assert not frozen, f"no update reaches {frozen}"
    vae.eval()
    with torch.no_grad():
        assert torch.isfinite(elbo.differentiable_loss(vae.model, vae.guide, x))


@pytest.mark.parametrize("prior,guide", sorted(REFUSED_PAIRS))
def test_refused_combinations_are_refused_by_the_config(prior, guide):
    with pytest.raises(ValueError, match=f"--prior {prior} with --guide {guide} is refused"):
        tiny(prior=prior, guide=guide)
