"""The direct loss of pyro_vae.infer.direct is the Pyro estimator, only faster.

Every check compares against Pyro itself on the same random draws (same seed
before each side): ``make_elbo(...).differentiable_loss`` for trace, meanfield
and iwae, and ``pyro.infer.RenyiELBO(...).loss`` for renyi.

To cover a new prior, guide or decoder, add one line to ``PART_CASES``.
"""

import contextlib
import importlib
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, RenyiELBO, Trace_ELBO

import pyro_vae.infer.direct as direct_module
from pyro_vae.infer.bounds import iwae_bound
from pyro_vae.infer.densities import bernoulli_log_likelihood
from pyro_vae.infer.direct import (
    BernoulliLogits,
    DiagonalNormal,
    DirectLoss,
    StandardNormal,
    diagonal_normal_kl,
    direct_log_weights,
)
from pyro_vae.infer.fast import (
    LossMismatch,
    check_loss_fn,
    make_loss_fn,
    make_optimizer,
)
from pyro_vae.infer.objectives import make_elbo
from pyro_vae.infer.scale import latent_scale
from pyro_vae.infer.weights import log_weights, trace_pair, weights_of_traces
from pyro_vae.models.decoders import BernoulliDecoder
from pyro_vae.models.guides import DiagonalGaussianEncoder
from pyro_vae.models.priors import Prior
from pyro_vae.models.registry import build_vae
from pyro_vae.models.vae import VAE
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.trainer import Trainer

INPUT_DIM, LATENT, HIDDEN, CLASSES, BATCH = 12, 4, [16], 3, 8
SMALL = dict(latent_dim=LATENT, hidden=HIDDEN, flow_hidden=16, pseudo_inputs=5, mixture_components=3,
             num_categories=3)


class StudentTPrior(Prior):
    """A prior with no registered KL to a Gaussian guide: meanfield must fall back to Monte Carlo."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, batch_size, y=None):
        zeros = torch.zeros(self.latent_dim)
        return dist.StudentT(3.0, zeros, torch.ones(self.latent_dim)).expand([batch_size, self.latent_dim]).to_event(1)


def from_config(**overrides):
    return lambda: build_vae(TrainConfig.from_flat(dict(**SMALL, **overrides)), INPUT_DIM, CLASSES)


#: One line per part set-up: name -> a builder of a small VAE.  Conditional set-ups get labels.
PART_CASES = {
    "bernoulli": from_config(),
    "gaussian": from_config(decoder="gaussian"),
    "gaussian-learned": from_config(decoder="gaussian-learned"),
    "conditional": from_config(conditional=True),
    "conditional-gaussian": from_config(conditional=True, decoder="gaussian"),
    "student-t-prior": lambda: VAE(StudentTPrior(LATENT), DiagonalGaussianEncoder(INPUT_DIM, LATENT, HIDDEN),
                                   BernoulliDecoder(LATENT, INPUT_DIM, HIDDEN)),
    "gaussian-pixel": from_config(decoder="gaussian-pixel"),
    "continuous-bernoulli": from_config(decoder="continuous-bernoulli"),
    "learned-normal-prior": from_config(prior="learned-normal"),
    "mixture-prior": from_config(prior="mixture"),
    "vamp-prior": from_config(prior="vamp"),
    "flow-prior": from_config(prior="flow"),
    "lowrank-guide": from_config(guide="lowrank"),
    "full-guide": from_config(guide="full"),
    "iaf-guide": from_config(guide="iaf"),
    "categorical": from_config(prior="categorical", guide="categorical"),
    "categorical-straight-through": from_config(prior="categorical", guide="categorical", straight_through=True),
}

#: objective -> (particles, alpha)
OBJECTIVES = {"trace": (1, None), "meanfield": (1, None), "iwae": (5, None), "renyi": (3, 0.5)}


def make_case(name):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    vae = PART_CASES[name]()
    gen = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((BATCH, INPUT_DIM), 0.4), generator=gen)
    y = torch.arange(BATCH) % CLASSES if vae.num_classes else None
    return vae, x, y


def pyro_loss(objective, vae, x, y):
    """The plain pyro.infer value: differentiable_loss, or RenyiELBO.loss (a float) for renyi."""
    k, alpha = OBJECTIVES[objective]
    if objective == "renyi":
        return RenyiELBO(alpha=alpha, num_particles=k, max_plate_nesting=1, vectorize_particles=True).loss(
            vae.model, vae.guide, x, y)
    return make_elbo(objective, k, alpha).differentiable_loss(vae.model, vae.guide, x, y)


def value(loss) -> float:
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)


def grads(loss, vae):
    params = [p for p in vae.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, expected, rtol=1e-5):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            assert float((g - e).norm()) <= rtol * float(e.norm()) + 1e-6


#: Set-ups whose three parts all have object-free fast forms: tested both ways, and must use them.
FAST_PART_CASES = {"bernoulli", "gaussian", "gaussian-learned", "conditional", "conditional-gaussian"}
#: renyi differs from iwae only in alpha: checked on the object-free parts alone.
DIRECT_CASES = [(part, objective, fast) for part in PART_CASES for objective in OBJECTIVES
                for fast in ((True, False) if part in FAST_PART_CASES else (False,))
                if objective != "renyi" or fast]


@pytest.mark.parametrize("part,objective,fast_parts", DIRECT_CASES,
                         ids=[f"{p}-{o}-{'fast' if f else 'distributions'}" for p, o, f in DIRECT_CASES])
def test_direct_loss_equals_pyro_on_the_same_draws(part, objective, fast_parts):
    vae, x, y = make_case(part)
    k, alpha = OBJECTIVES[objective]
    direct = DirectLoss(make_elbo(objective, k, alpha), vae, fast_parts=fast_parts)
    assert direct.fast_parts == fast_parts
    for kl_scale in (1.0, 0.3):
        with latent_scale(scale=kl_scale):
            pyro.set_rng_seed(7)
            expected = pyro_loss(objective, vae, x, y)
            pyro.set_rng_seed(7)
            got = direct(vae.model, vae.guide, x, y)
            assert value(got) == pytest.approx(value(expected), rel=1e-6, abs=1e-5), kl_scale
            pyro.set_rng_seed(7)
            expected_grads = grads(make_elbo(objective, k, alpha).differentiable_loss(vae.model, vae.guide, x, y),
                                   vae)
        assert_grads_close(grads(got, vae), expected_grads)


def test_kl_scale_changes_the_loss_so_the_comparison_can_fail():
    vae, x, y = make_case("bernoulli")
    direct = DirectLoss(make_elbo("trace"), vae)
    losses = []
    for kl_scale in (1.0, 0.3):
        pyro.set_rng_seed(7)
        with latent_scale(scale=kl_scale):
            losses.append(value(direct(vae.model, vae.guide, x, y)))
    assert abs(losses[0] - losses[1]) > 1e-2


def test_fast_distributions_reproduce_torch_to_the_bit():
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    reference = dist.Normal(loc, scale).to_event(1)
    fast = DiagonalNormal(loc, scale)
    for k in (1, 4):
        torch.manual_seed(1)
        expected = (reference.expand((k, 5)) if k > 1 else reference).rsample()
        torch.manual_seed(1)
        z = (fast.expand((k, 5)) if k > 1 else fast).rsample()
        assert torch.equal(z, expected)
        assert torch.equal(fast.log_prob(z), reference.log_prob(z))
    prior = dist.Normal(torch.zeros(3), torch.ones(3)).expand([5, 3]).to_event(1)
    assert torch.equal(StandardNormal().log_prob(z), prior.log_prob(z))
    for fast_prior in (StandardNormal(), DiagonalNormal(torch.zeros(3), torch.ones(3))):
        assert torch.equal(diagonal_normal_kl(fast, fast_prior), torch.distributions.kl_divergence(reference, prior))
    other = DiagonalNormal(torch.randn(3), torch.rand(3) + 0.5)
    assert torch.equal(diagonal_normal_kl(fast, other), torch.distributions.kl_divergence(
        reference, dist.Normal(other.loc, other.scale).expand([5, 3]).to_event(1)))
    logits, x = torch.randn(2, 5, 7), torch.bernoulli(torch.full((5, 7), 0.5))
    assert torch.equal(BernoulliLogits(logits).log_prob(x), dist.Bernoulli(logits=logits).to_event(1).log_prob(x))


def test_a_vae_subclass_that_overrides_model_is_not_taken_for_the_builtin_one():
    class TemperedVAE(VAE):
        def model(self, x, y=None):
            with pyro.poutine.scale(scale=0.5):
                return super().model(x, y)

    base, x, _ = make_case("bernoulli")
    vae = TemperedVAE(base.prior, base.encoder, base.decoder)
    elbo = make_elbo("trace")
    loss_fn = make_loss_fn(elbo, vae.model, vae.guide, (x,))
    assert not isinstance(loss_fn, DirectLoss)  # the lean estimator reads the subclass's own program
    with pytest.raises(ValueError, match="TemperedVAE overrides model or guide"):
        DirectLoss(elbo, vae)


@pytest.mark.parametrize("elbo", [JitTrace_ELBO(max_plate_nesting=1),
                                  Trace_ELBO(num_particles=3, vectorize_particles=False, max_plate_nesting=1),
                                  Trace_ELBO(max_plate_nesting=2)],
                         ids=["jit", "sequential-particles", "two-plates"])
def test_estimators_without_a_direct_form_do_not_get_one(elbo):
    vae, x, _ = make_case("bernoulli")
    with pytest.warns(UserWarning) if type(elbo) is JitTrace_ELBO else _no_warning():
        loss_fn = make_loss_fn(elbo, vae.model, vae.guide, (x,))
    assert not isinstance(loss_fn, DirectLoss)


def test_other_programs_and_other_handlers_go_to_the_pyro_estimator():
    vae, x, _ = make_case("bernoulli")
    other, _, _ = make_case("gaussian")
    elbo = make_elbo("trace")
    direct = DirectLoss(elbo, vae)
    pyro.set_rng_seed(3)
    expected = elbo.differentiable_loss(other.model, other.guide, x)
    pyro.set_rng_seed(3)
    assert value(direct(other.model, other.guide, x)) == pytest.approx(value(expected), rel=1e-6)
    with pyro.poutine.scale(scale=0.5):  # a handler the direct loss does not reproduce
        pyro.set_rng_seed(3)
        expected = elbo.differentiable_loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(3)
        assert value(direct(vae.model, vae.guide, x)) == pytest.approx(value(expected), rel=1e-6)


def test_a_drifted_fast_part_is_caught_and_the_distributions_used(monkeypatch):
    vae, x, _ = make_case("bernoulli")
    monkeypatch.setitem(direct_module.FAST_DECODERS, BernoulliDecoder,
                        lambda decoder, z, c: BernoulliLogits(2 * decoder.features(z, c)))
    with pytest.warns(UserWarning, match="distribution objects"):
        loss_fn = make_loss_fn(make_elbo("trace"), vae.model, vae.guide, (x,))
    assert isinstance(loss_fn, DirectLoss) and not loss_fn.fast_parts


#: The one-home functions the direct loss calls, each replaced by a wrong version: the check must notice.
BROKEN_EQUATIONS = {
    "_scaled": ("trace", lambda log_density, scale: log_density),  # ignores the latent scale
    "reparameterize": ("trace", lambda loc, scale, eps: loc + 0.5 * eps * scale),
    "diagonal_gaussian_log_density": ("trace", lambda value, loc, scale, noise=None:
                                      ((value - loc) ** 2 / -scale**2).sum(-1)),
    "standard_normal_log_density": ("trace", lambda value: (value**2 / -3).sum(-1)),
    "bernoulli_log_likelihood": ("trace", lambda x, logits, total=False: -bernoulli_log_likelihood(x, logits, total)),
    "gaussian_kl_to_standard_normal": ("meanfield", lambda loc, scale: 0.9 * (loc**2 + scale**2).sum(-1)),
    "sgvb_estimator": ("meanfield", lambda log_lik, kl, beta: log_lik.mean(0) - kl),
    "elbo_bound": ("trace", lambda log_w: 1.1 * log_w.mean(0)),
    "renyi_bound": ("iwae", lambda log_w, alpha: log_w.mean(0)),
}


@pytest.mark.parametrize("function", sorted(BROKEN_EQUATIONS))
def test_the_direct_loss_runs_the_one_home_of_each_equation(monkeypatch, function):
    """Break a function and the direct loss (fast parts) disagrees with Pyro: it is the code that runs."""
    vae, x, _ = make_case("bernoulli")
    objective, broken = BROKEN_EQUATIONS[function]
    elbo = make_elbo(objective, *OBJECTIVES[objective])
    check_loss_fn(DirectLoss(elbo, vae), elbo, vae.model, vae.guide, (x,))  # passes as shipped
    monkeypatch.setattr(direct_module, function, broken)
    with pytest.raises(LossMismatch):
        check_loss_fn(DirectLoss(elbo, vae), elbo, vae.model, vae.guide, (x,))


def test_a_wrong_direct_loss_falls_back_with_a_warning(monkeypatch):
    vae, x, _ = make_case("bernoulli")
    monkeypatch.setattr(direct_module, "_scaled", lambda log_density, scale: log_density)  # ignores the scale
    elbo = make_elbo("trace")
    with pytest.raises(LossMismatch, match="latent scale 0.3"):
        check_loss_fn(DirectLoss(elbo, vae), elbo, vae.model, vae.guide, (x,))
    with pytest.warns(UserWarning, match="latent scale 0.3.*using FastTrace_ELBO instead"):
        loss_fn = make_loss_fn(elbo, vae.model, vae.guide, (x,))
    assert getattr(loss_fn, "__self__", None).__class__.__name__ == "FastTrace_ELBO"


def test_the_check_leaves_rng_and_gradients_untouched():
    vae, x, _ = make_case("bernoulli")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert isinstance(make_loss_fn(make_elbo("iwae", 5), vae.model, vae.guide, (x,)), DirectLoss)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in vae.parameters())


def test_the_direct_loss_never_syncs_with_the_host(monkeypatch):
    """No .item(), float(), bool() or int() on a tensor: on a GPU each would stall the step."""
    def sync(*args, **kwargs):
        raise AssertionError("host sync inside the direct loss")

    for name, fast in (("bernoulli", True), ("gaussian", True), ("mixture-prior", False)):
        vae, x, _ = make_case(name)
        losses = [DirectLoss(make_elbo(o, *OBJECTIVES[o]), vae, fast_parts=fast) for o in OBJECTIVES]
        with monkeypatch.context() as patch:
            for method in ("item", "__float__", "__bool__", "__int__", "tolist"):
                patch.setattr(torch.Tensor, method, sync)
            for loss_fn in losses:
                loss_fn(vae.model, vae.guide, x).backward()


@pytest.mark.parametrize("part", sorted(FAST_PART_CASES))
def test_direct_log_weights_equal_the_traced_ones(part):
    """The object-free importance weights are those of the traced programs, to the bit."""
    vae, x, y = make_case(part)
    args = (x,) if y is None else (x, y)
    for k in (1, 6):
        pyro.set_rng_seed(2)
        expected = weights_of_traces(*trace_pair(vae.model, vae.guide, *args, num_particles=k))
        pyro.set_rng_seed(2)
        got = direct_log_weights(vae, x, y, k)
        for g, e in zip(got, expected[:3], strict=True):
            assert g.shape == (k, BATCH) and torch.equal(g, e)


def test_direct_log_weights_decline_parts_without_a_fast_form():
    vae, x, _ = make_case("mixture-prior")
    assert direct_log_weights(vae, x, None, 3) is None


def test_make_optimizer_is_adam_with_the_same_updates():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    fast, plain = make_optimizer(a.parameters(), lr=0.01), torch.optim.Adam(b.parameters(), lr=0.01)
    assert isinstance(fast, torch.optim.Adam) and fast.defaults["lr"] == 0.01
    assert fast.defaults["fused"] or fast.defaults["foreach"]
    x = torch.randn(10, 6)
    for _ in range(5):
        for model, opt in ((a, fast), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("objective", ["trace", "meanfield", "iwae"])
def test_the_benchmarks_handwritten_loop_is_the_same_estimator(objective):
    """experiments/handwritten.py, the speed reference, computes Pyro's loss from the same draws."""
    handwritten = _handwritten()
    vae, x, _ = make_case("bernoulli")
    k = 5 if objective == "iwae" else 1
    pyro.set_rng_seed(4)
    expected = make_elbo(objective, k).differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    got = handwritten.negative_elbo_sum(vae.encoder.net, vae.decoder.net, x, objective, k)
    assert value(got) == pytest.approx(value(expected), rel=1e-5)
    pyro.set_rng_seed(5)
    with torch.no_grad():
        expected = iwae_bound(log_weights(vae.model, vae.guide, x, num_particles=40).log_weight)
    pyro.set_rng_seed(5)
    got = handwritten.importance_log_likelihood(vae.encoder.net, vae.decoder.net, x, 40, chunk_size=40,
                                                batch_size=BATCH)
    assert torch.allclose(got, expected, rtol=1e-5)


def _handwritten():
    """experiments/handwritten.py (experiments/ is not a package)."""
    experiments = str(Path(__file__).resolve().parents[2] / "experiments")
    if experiments not in sys.path:
        sys.path.insert(0, experiments)
    return importlib.import_module("handwritten")



@pytest.mark.parametrize("objective,extra", [("iwae", {"particles": 3})])
def test_training_through_the_direct_loss_is_training_through_pyro(tmp_path, digits, monkeypatch, objective, extra):
    """An epoch with the trainer's direct loss ends at the same parameters as one with Pyro's estimator."""
    config = dict(latent_dim=4, hidden=[32], batch_size=64, progress=False, patience=0, epochs=1, beta=0.5,
                  objective=objective, **extra)
    fast = Trainer(TrainConfig.from_flat(dict(run_dir=str(tmp_path / "fast"), **config)), dataset=digits)
    assert isinstance(fast.loss_fn, DirectLoss) and fast.loss_fn.fast_parts
    fast_params = fast.optimizer.param_groups[0]["params"]
    initial = [p.detach().clone() for p in fast_params]
    fast.fit()
    monkeypatch.setattr(sys.modules[Trainer.__module__], "make_loss_fn",
                        lambda elbo, model, guide, probe_args=None: elbo.differentiable_loss)
    slow = Trainer(TrainConfig.from_flat(dict(run_dir=str(tmp_path / "pyro"), **config)), dataset=digits)
    assert slow.loss_fn == slow.elbo.differentiable_loss
    slow.fit()
    for i, (p, q, p0) in enumerate(zip(fast_params, slow.optimizer.param_groups[0]["params"], initial)):
        assert not torch.equal(p, p0), f"parameter {i} did not train"
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), i


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
