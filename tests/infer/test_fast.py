"""The lean estimators of pyro_vae.infer.fast are Pyro's, for any program they can read.

Every comparison runs Pyro's estimator and the lean one from the same RNG
state and asserts the same loss and the same gradient of every parameter.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn

import pyro_vae.infer.fast as fast_module
from pyro_vae.infer.direct import DirectLoss
from pyro_vae.infer.fast import (
    FastRenyiELBO,
    FastTrace_ELBO,
    FastTraceMeanField_ELBO,
    UnsupportedProgram,
    check_loss_fn,
    fast_estimator,
    make_loss_fn,
)
from pyro_vae.infer.objectives import make_elbo
from pyro_vae.infer.params import program_parameters
from pyro_vae.infer.scale import latent_scale
from pyro_vae.infer.weights import LogWeights
from pyro_vae.models.registry import build_vae
from pyro_vae.train.config import TrainConfig

D, R, B = 10, 3, 6

#: name -> (objective, particles, alpha)
ESTIMATORS = {
    "trace": ("trace", 1, None), "trace-K3": ("trace", 3, None),
    "meanfield": ("meanfield", 1, None), "meanfield-K2": ("meanfield", 2, None),
    "iwae": ("iwae", 5, None), "renyi": ("renyi", 3, 0.5),
}


def data(n=B, seed=1):
    return torch.bernoulli(torch.full((n, D), 0.4), generator=torch.Generator().manual_seed(seed))


def plain_vae():
    """A VAE written as a user writes it: two plain functions and ``pyro.module``."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 2 * R))
    decoder = nn.Sequential(nn.Linear(R, 16), nn.ReLU(), nn.Linear(16, D))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(R), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_var = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, (0.5 * log_var).exp()).to_event(1))

    return model, guide


def two_latent_program():
    """Hierarchical latents named freely (``top``, ``bottom``), a learned prior scale from
    ``pyro.param``, and an extra plate over features inside the data plate."""
    torch.manual_seed(0)
    up = nn.Linear(2, R)
    out = nn.Linear(R, D)
    enc_top, enc_bottom = nn.Linear(D, 4), nn.Linear(D + 2, 2 * R)

    def model(x):
        pyro.module("up", up)
        pyro.module("out", out)
        prior_scale = pyro.param("prior_scale", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("points", x.shape[0], dim=-2):
            top = pyro.sample("top", dist.Normal(x.new_zeros(2), prior_scale).to_event(1))
            bottom = pyro.sample("bottom", dist.Normal(up(top), 1.0).to_event(1))
            with pyro.plate("features", D, dim=-1):
                pyro.sample("x", dist.Bernoulli(logits=out(bottom).squeeze(-2)), obs=x)

    def guide(x):
        pyro.module("enc_top", enc_top)
        pyro.module("enc_bottom", enc_bottom)
        with pyro.plate("points", x.shape[0], dim=-2):
            h = enc_top(x).unsqueeze(-2)
            top = pyro.sample("top", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))
            h = enc_bottom(torch.cat([x.unsqueeze(-2).expand(*top.shape[:-1], D), top], -1))
            pyro.sample("bottom", dist.Normal(h[..., :R], h[..., R:].exp()).to_event(1))

    return model, guide


def make(estimator, nesting=1):
    objective, k, alpha = ESTIMATORS[estimator]
    elbo = make_elbo(objective, k, alpha)
    if nesting != 1:  # make_elbo assumes one data plate
        elbo.max_plate_nesting += nesting - 1
    return elbo


def loss_and_grads(loss_fn, model, guide, x, params, seed=7):
    pyro.set_rng_seed(seed)
    loss = loss_fn(model, guide, x)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_same_as_pyro(elbo, model, guide, x, scales=(1.0, 0.3, 0.0)):
    fast = fast_estimator(elbo)
    assert isinstance(fast, elbo.__class__) and type(fast) is not type(elbo)
    params = list(program_parameters(model, guide, x).values())
    assert params
    for scale in scales:
        with latent_scale(scale=scale):
            expected, expected_grads = loss_and_grads(elbo.differentiable_loss, model, guide, x, params)
            got, got_grads = loss_and_grads(fast.differentiable_loss, model, guide, x, params)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-5), scale
        for g, e in zip(got_grads, expected_grads, strict=True):
            assert (g is None) == (e is None)
            if g is not None:
                assert torch.allclose(g, e, rtol=1e-5, atol=1e-6), scale


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_plain_functions_with_one_latent_site(estimator):
    model, guide = plain_vae()
    assert_same_as_pyro(make(estimator), model, guide, data())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_latent_sites_named_freely_with_an_extra_plate(estimator):
    model, guide = two_latent_program()
    assert_same_as_pyro(make(estimator, nesting=2), model, guide, data())


def test_sequential_particles_and_the_latent_scale_change_the_loss():
    model, guide = plain_vae()
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=False, max_plate_nesting=1)
    assert_same_as_pyro(elbo, model, guide, data(), scales=(1.0,))
    fast = fast_estimator(make("trace"))
    losses = []
    for scale in (1.0, 0.3):
        pyro.set_rng_seed(7)
        with latent_scale(scale=scale):
            losses.append(fast.differentiable_loss(model, guide, data()).item())
    assert abs(losses[0] - losses[1]) > 1e-2  # so the comparisons at several scales can fail


def test_a_pyro_module_and_bound_methods_of_an_nn_module():
    class Program(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(R))
            self.net = PyroModule[nn.Linear](D, 2 * R)
            self.out = PyroModule[nn.Linear](R, D)

        @pyro_method
        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(self.loc, 1.0).to_event(1))
                pyro.sample("obs", dist.Bernoulli(logits=self.out(z)).to_event(1), obs=x)

        @pyro_method
        def guide(self, x):
            with pyro.plate("data", x.shape[0]):
                h = self.net(x)
                pyro.sample("latent", dist.Normal(h[..., :R], h[..., R:].exp()).to_event(1))

    torch.manual_seed(0)
    program = Program()
    names = set(program_parameters(program.model, program.guide, data()))
    assert names == {"loc", "net.weight", "net.bias", "out.weight", "out.bias"}
    for estimator in ("trace", "meanfield", "iwae"):
        assert_same_as_pyro(make(estimator), program.model, program.guide, data(), scales=(1.0, 0.3))


def test_program_parameters_are_the_tensors_the_programs_use():
    model, guide = two_latent_program()
    torch.manual_seed(4)
    before = torch.get_rng_state()
    params = program_parameters(model, guide, data())
    assert torch.equal(torch.get_rng_state(), before)  # no draw of the probe run is left behind
    assert list(params)[:4] == ["enc_top$$$weight", "enc_top$$$bias", "enc_bottom$$$weight", "enc_bottom$$$bias"]
    store = pyro.get_param_store()
    assert params["prior_scale"] is store._params["prior_scale"]  # unconstrained: the leaf to step
    assert all(p.is_leaf and p.requires_grad for p in params.values())


@pytest.mark.parametrize("estimator", ["trace", "iwae"])
def test_make_loss_fn_picks_the_lean_estimator_for_plain_functions_and_leaves_no_trace(estimator):
    model, guide = plain_vae()
    x = data(40)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    loss_fn = make_loss_fn(make(estimator), model, guide, (x,))
    assert isinstance(getattr(loss_fn, "__self__", None), (FastTrace_ELBO, FastRenyiELBO))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in program_parameters(model, guide, x).values())


def test_make_loss_fn_picks_the_direct_loss_for_the_builtin_vae():
    pyro.set_rng_seed(0)
    vae = build_vae(TrainConfig.from_flat(dict(latent_dim=R, hidden=[8])), D)
    assert isinstance(make_loss_fn(make("meanfield"), vae.model, vae.guide, (data(),)), DirectLoss)


def non_reparameterized_program():
    torch.manual_seed(0)
    logits = nn.Linear(D, R)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(probs=x.new_full((R,), 0.5)).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(*z.shape[:-1], D), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("logits", logits)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits(x)).to_event(1))

    return model, guide


def test_a_non_reparameterized_site_falls_back_to_pyro_with_a_warning():
    model, guide = non_reparameterized_program()
    elbo = make("trace")
    with pytest.raises(UnsupportedProgram, match="'z' is not reparameterized"):
        fast_estimator(elbo).differentiable_loss(model, guide, data())
    with pytest.warns(UserWarning, match="'z' is not reparameterized.*Trace_ELBO.differentiable_loss"):
        loss_fn = make_loss_fn(elbo, model, guide, (data(),))
    assert loss_fn == elbo.differentiable_loss


def test_an_estimator_without_a_lean_form_falls_back_with_a_warning():
    model, guide = plain_vae()
    elbo = JitTrace_ELBO(max_plate_nesting=1)
    with pytest.warns(UserWarning, match="no lean form of JitTrace_ELBO"):
        assert make_loss_fn(elbo, model, guide, (data(),)) == elbo.differentiable_loss


def test_programs_the_lean_estimators_cannot_read_are_refused():
    def model(x):
        with pyro.plate("data", 100, subsample_size=x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])

    def guide(x):
        with pyro.plate("data", 100, subsample_size=x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    fast = fast_estimator(make("trace"))
    with pytest.raises(UnsupportedProgram, match="plate 'data' is subsampled"):
        fast.differentiable_loss(model, guide, data())

    def full_model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x[:, 0])

    def full_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(UnsupportedProgram, match="model site 'w' is neither observed nor in the guide"):
        fast.differentiable_loss(full_model, full_guide, data())

    def enumerated_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0), infer={"enumerate": "parallel"})

    with pytest.raises(UnsupportedProgram, match="'z' is enumerated"):
        fast.differentiable_loss(full_model, enumerated_guide, data())


#: The one-home functions the lean estimators call, each replaced by a wrong version.
BROKEN = {
    "elbo_bound": ("trace-K3", lambda log_w: 1.1 * log_w.mean(0)),
    "canonical_elbo": ("meanfield", lambda reconstruction, kl: reconstruction - 0.5 * kl),
    "renyi_bound": ("renyi", lambda log_w, alpha: log_w.mean(0)),
    "weights_from_sites": ("iwae", lambda m, g, reduce, parts: LogWeights(
        reduce(next(iter(m.values()))["fn"].log_prob(next(iter(m.values()))["value"])), None, None, {})),
}


@pytest.mark.parametrize("function", sorted(BROKEN))
def test_the_lean_estimators_run_the_one_home_of_each_equation(monkeypatch, function):
    model, guide = plain_vae()
    estimator, broken = BROKEN[function]
    elbo = make(estimator)
    fast = fast_estimator(elbo)
    check_loss_fn(fast.differentiable_loss, elbo, model, guide, (data(),))
    monkeypatch.setattr(fast_module, function, broken)
    with pytest.raises(fast_module.LossMismatch):
        check_loss_fn(fast.differentiable_loss, elbo, model, guide, (data(),))


def test_the_lean_estimators_never_sync_with_the_host(monkeypatch):
    """No .item(), float(), bool() or int() on a tensor: on a GPU each would stall the step."""
    def sync(*args, **kwargs):
        raise AssertionError("host sync inside a lean estimator")

    programs = [plain_vae(), two_latent_program()]
    estimators = [(fast_estimator(make(name, nesting)), nesting) for name in ESTIMATORS for nesting in (1, 2)]
    x = data()
    with monkeypatch.context() as patch:
        for method in ("item", "__float__", "__bool__", "__int__", "tolist"):
            patch.setattr(torch.Tensor, method, sync)
        for nesting, (model, guide) in enumerate(programs, start=1):
            for fast, n in estimators:
                if n == nesting:
                    with latent_scale(scale=0.3):
                        fast.differentiable_loss(model, guide, x).backward()


def test_the_lean_estimators_drive_svi():
    model, guide = plain_vae()
    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=FastTraceMeanField_ELBO(max_plate_nesting=1))
    x = data(32)
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < losses[0]
