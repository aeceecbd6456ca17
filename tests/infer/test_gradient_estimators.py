"""iwae-dreg, stl, miwae, ciwae and piwae estimate the gradients they claim, with the variance the papers say.

On the learnable linear-Gaussian pair (:mod:`linear_gaussian_pair`) the ELBO and its
gradient are exact.  "In expectation" checks average many draws (a few points repeated
in one batch, deterministic seeds) and compare within a few standard errors, elementwise;
"on the same draws" checks run two estimators from one RNG state and compare to rounding.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussianProblem
from linear_gaussian_pair import LinearGaussianPair, TwoLayerLinearGaussian, gradient_draws, z_scores
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO
from torch import nn

from pyro_vae.infer.bounds import miwae_bound
from pyro_vae.infer.fast import LossMismatch, make_loss_fn
from pyro_vae.infer.objectives import make_elbo, pyro_log_weights
from pyro_vae.infer.tighter import MIWAE_ELBO
from pyro_vae.models.registry import build_vae
from pyro_vae.train.config import TrainConfig

ESTIMATORS = ("iwae-dreg", "stl", "miwae", "ciwae", "piwae")
PROBLEM = LinearGaussianProblem(n=4, seed=0)
X = PROBLEM.x
CALLS, REPEATS = 60, 100  # 6000 gradient draws on each of the 4 points
Z_MAX = 4.5  # largest |z| over all parameter elements


@pytest.fixture(autouse=True)
def one_thread_fresh_store():
    """Tiny float64 programs run fastest on one thread; every test starts from an empty param store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    torch.set_num_threads(threads)


def pair(shift=0.5, narrow=1.5):
    """A guide away from the exact posterior: its mean shifted, its covariance factor widened."""
    return LinearGaussianPair(PROBLEM, shift=shift, narrow=narrow)


def draws(name, program, k=None, seed=0, scale=1.0, calls=CALLS, **options):
    """``(theta, phi)`` gradient draws of objective ``name``, each ``(calls, P)``."""
    return gradient_draws(make_elbo(name, k, **options).differentiable_loss, program, X, calls, REPEATS, seed, scale)


def same_draws(name, program, seed, k=None, **options):
    """One gradient of ``name`` on ``X`` from ``seed``, as ``(theta, phi)``."""
    theta, phi = gradient_draws(make_elbo(name, k, **options).differentiable_loss, program, X, 1, 1, seed)
    return theta[0], phi[0]


# -- values ------------------------------------------------------------------------------------------

def reference_value(name, program, seed):
    """Minus the bound of Pyro's own estimators (their traces), from ``seed``."""
    common = dict(max_plate_nesting=1, vectorize_particles=True)

    def loss(elbo):
        pyro.set_rng_seed(seed)
        return elbo.loss(program.model, program.guide, X)

    if name == "iwae-dreg":
        return loss(RenyiELBO(alpha=0, num_particles=5, **common))
    if name == "stl":
        return loss(Trace_ELBO(num_particles=3, **common))
    if name == "ciwae":
        return 0.25 * loss(Trace_ELBO(num_particles=5, **common)) + 0.75 * loss(RenyiELBO(alpha=0, num_particles=5,
                                                                                          **common))
    if name == "piwae":
        return loss(RenyiELBO(alpha=0, num_particles=12, **common))
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return -float(miwae_bound(pyro_log_weights(Trace_ELBO(num_particles=12, **common), program.model,
                                                   program.guide, X), 3).sum())


OPTIONS = {"iwae-dreg": dict(num_particles=5), "stl": dict(num_particles=3), "ciwae": dict(num_particles=5,
           ciwae_beta=0.25), "miwae": dict(num_particles=4, groups=3), "piwae": dict(num_particles=4, groups=3)}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_the_loss_is_minus_the_pyro_bound_on_the_same_draws_with_and_without_gradients(name):
    program = pair()
    elbo = make_elbo(name, **OPTIONS[name])
    expected = reference_value(name, program, seed=3)
    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(program.model, program.guide, X)
    assert loss.requires_grad
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    pyro.set_rng_seed(3)
    with torch.no_grad():  # the trainer's validation bound: the value alone, no graph
        value = elbo.differentiable_loss(program.model, program.guide, X)
    assert not value.requires_grad
    assert float(value) == pytest.approx(expected, rel=1e-10)


# -- gradients in expectation -----------------------------------------------------------------------

@pytest.mark.parametrize("k,scale", [(1, 1.0), (3, 1.0), (1, 0.3)])
def test_stl_gradient_is_unbiased_for_the_exact_elbo_gradient(k, scale):
    program = pair()
    exact_theta, exact_phi = program.exact_elbo_gradient(X, scale)
    theta, phi = draws("stl", program, k, seed=1, scale=scale)
    assert z_scores(theta, exact_theta).abs().max() < Z_MAX
    assert z_scores(phi, exact_phi).abs().max() < Z_MAX


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_dreg_guide_gradient_is_unbiased_for_the_iwae_gradient(scale):
    """Against the reparameterized IWAE estimator (D46), unbiased for the IWAE-K gradient; under a
    latent scale s the coefficients (1 - s) w~ + s w~^2 keep DReG unbiased for the scaled bound."""
    program = pair()
    theta_iwae, phi_iwae = draws("iwae", program, 5, seed=2, scale=scale)
    theta_dreg, phi_dreg = draws("iwae-dreg", program, 5, seed=3, scale=scale)
    assert z_scores(phi_dreg, phi_iwae).abs().max() < Z_MAX
    assert z_scores(theta_dreg, theta_iwae).abs().max() < Z_MAX


def test_dreg_model_gradient_is_the_iwae_gradient_and_with_one_particle_the_whole_gradient_is_stl():
    program = pair()
    for seed in (0, 1):
        theta_iwae, _ = same_draws("iwae", program, seed, k=5)
        theta_dreg, _ = same_draws("iwae-dreg", program, seed, k=5)
        assert torch.allclose(theta_dreg, theta_iwae, rtol=1e-10, atol=1e-10)
        # K = 1: w~ = 1, so DReG's guide gradient is the path gradient of STL
        for got, expected in zip(same_draws("iwae-dreg", program, seed, k=1), same_draws("stl", program, seed, k=1)):
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_miwae_gradient_is_unbiased_for_the_iwae_gradient_of_one_group():
    """E[grad MIWAE_{M,L}] = grad E[IWAE_L]; with one group MIWAE is IWAE on the same draws."""
    program = pair()
    theta_iwae, phi_iwae = draws("iwae", program, 4, seed=2)
    theta_miwae, phi_miwae = draws("miwae", program, 4, seed=3, groups=3)
    assert z_scores(theta_miwae, theta_iwae).abs().max() < Z_MAX
    assert z_scores(phi_miwae, phi_iwae).abs().max() < Z_MAX
    for got, expected in zip(same_draws("miwae", program, 5, k=4, groups=1), same_draws("iwae", program, 5, k=4)):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_ciwae_gradient_is_the_convex_combination_of_the_elbo_and_iwae_gradients():
    program = pair()
    beta = 0.25
    for seed in (0, 1):  # on the same K draws: beta * trace + (1 - beta) * iwae
        trace = same_draws("trace", program, seed, k=5)
        iwae = same_draws("iwae", program, seed, k=5)
        ciwae = same_draws("ciwae", program, seed, k=5, ciwae_beta=beta)
        for got, t, i in zip(ciwae, trace, iwae):
            assert torch.allclose(got, beta * t + (1 - beta) * i, rtol=1e-10, atol=1e-10)
    # in expectation: beta * (exact ELBO gradient) + (1 - beta) * (IWAE-K gradient)
    exact_theta, exact_phi = program.exact_elbo_gradient(X)
    theta_iwae, phi_iwae = draws("iwae", program, 5, seed=2)
    theta, phi = draws("ciwae", program, 5, seed=3, ciwae_beta=beta)
    assert z_scores(theta - beta * exact_theta, (1 - beta) * theta_iwae).abs().max() < Z_MAX
    assert z_scores(phi - beta * exact_phi, (1 - beta) * phi_iwae).abs().max() < Z_MAX


@pytest.mark.parametrize("program", ["linear-gaussian", "two latent sites"])
def test_piwae_gives_the_model_the_iwae_gradient_and_the_guide_the_miwae_gradient(program):
    """On the same M L draws: theta as IWAE_{M L}, phi as MIWAE_{M, L} (D50)."""
    program = pair() if program == "linear-gaussian" else TwoLayerLinearGaussian(PROBLEM)
    for seed in (0, 1):
        theta_piwae, phi_piwae = same_draws("piwae", program, seed, k=4, groups=3)
        theta_iwae, _ = same_draws("iwae", program, seed, k=12)
        _, phi_miwae = same_draws("miwae", program, seed, k=4, groups=3)
        assert torch.allclose(theta_piwae, theta_iwae, rtol=1e-9, atol=1e-9)
        assert torch.allclose(phi_piwae, phi_miwae, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(phi_piwae, same_draws("iwae", program, seed, k=12)[1], rtol=1e-3)


def test_two_latent_sites_dreg_and_stl_are_unbiased():
    """q(top | bottom) depends on the other latent: the guide is re-run on the leaves, and the
    path gradients still average to the reparameterized ones."""
    program = TwoLayerLinearGaussian(PROBLEM)
    theta_iwae, phi_iwae = draws("iwae", program, 5, seed=2)
    theta_dreg, phi_dreg = draws("iwae-dreg", program, 5, seed=3)
    assert z_scores(phi_dreg, phi_iwae).abs().max() < Z_MAX
    assert z_scores(theta_dreg, theta_iwae).abs().max() < Z_MAX
    theta_trace, phi_trace = draws("trace", program, 1, seed=2)
    theta_stl, phi_stl = draws("stl", program, 1, seed=3)
    assert z_scores(phi_stl, phi_trace).abs().max() < Z_MAX
    assert z_scores(theta_stl, theta_trace).abs().max() < Z_MAX


# -- variance ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [10, 50])
def test_dreg_guide_gradient_variance_is_below_iwae(k):
    """Tucker et al. 2018: the second reparameterization removes the score terms' variance."""
    program = pair(shift=0.2, narrow=1.2)
    _, phi_iwae = draws("iwae", program, k, seed=2, calls=30)
    _, phi_dreg = draws("iwae-dreg", program, k, seed=3, calls=30)
    assert phi_dreg.var(0).sum() < 0.5 * phi_iwae.var(0).sum()


def test_stl_guide_gradient_is_zero_at_the_exact_posterior_and_less_noisy_than_trace_near_it():
    """Roeder et al. 2017: at q = p(z | x), log w is constant in z, so STL's guide gradient is 0
    for every draw, while trace's keeps the score term's noise."""
    exact = LinearGaussianPair(PROBLEM)
    _, phi_stl = draws("stl", exact, 1, seed=1, calls=10)
    _, phi_trace = draws("trace", exact, 1, seed=1, calls=10)
    assert phi_stl.abs().max() < 1e-9
    assert phi_trace.std(0).min() > 1e-3
    near = pair(shift=0.05, narrow=1.05)
    _, phi_stl = draws("stl", near, 1, seed=1, calls=30)
    _, phi_trace = draws("trace", near, 1, seed=2, calls=30)
    assert phi_stl.var(0).sum() < 0.1 * phi_trace.var(0).sum()


# -- programs and the trainer's loss ------------------------------------------------------------------

def _non_reparameterized():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            pyro.sample("x", dist.Normal(b.unsqueeze(-1).expand(*b.shape, x.shape[-1]), 1.0).to_event(1), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.3, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(p.expand(x.shape[0])))
    return model, guide


def _gaussian_pair(subsample=False, enumerate_site=False, guide_scale=None):
    loc = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            u = pyro.sample("u", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True) + u.sum(-1, keepdim=True), 1.0).expand(
                (*z.shape[:-1], x.shape[-1])).to_event(1), obs=x)

    def guide(x):
        pyro.module("guide", nn.ParameterList([loc]))
        plate = pyro.plate("data", 8 if subsample else x.shape[0], subsample_size=x.shape[0] if subsample else None)
        with plate:
            infer = {"enumerate": "parallel"} if enumerate_site else {}
            pyro.sample("z", dist.Normal(loc.expand(x.shape[0], 2), 1.0).to_event(1), infer=infer)
            with poutine.scale(scale=guide_scale or 1.0):
                pyro.sample("u", dist.Normal(x.new_zeros(x.shape[0], 3), 1.0).to_event(1))
    return model, guide


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("program,message", [
    (_non_reparameterized, "guide site 'b' is not reparameterized"),
    (lambda: _gaussian_pair(subsample=True), "plate 'data' is subsampled"),
    (lambda: _gaussian_pair(enumerate_site=True), "site 'z' is enumerated"),
])
def test_programs_the_estimators_cannot_read_are_refused_by_site_and_reason(name, program, message):
    model, guide = program()
    with pytest.raises(ValueError, match=f"cannot train this program: {message}"):
        make_loss_fn(make_elbo(name), model, guide, (X,))


def test_dreg_refuses_guide_sites_of_different_scales():
    model, guide = _gaussian_pair(guide_scale=0.5)
    with pytest.raises(ValueError, match="guide sites 'z' and 'u' have different scales"):
        make_loss_fn(make_elbo("iwae-dreg"), model, guide, (X,))
    make_loss_fn(make_elbo("stl"), model, guide, (X,))  # STL is unbiased at any scale


@pytest.mark.parametrize("name", ESTIMATORS)
def test_make_loss_fn_returns_the_estimator_itself_without_a_warning(name, recwarn):
    pyro.set_rng_seed(0)
    vae = build_vae(TrainConfig.from_flat(dict(latent_dim=2, hidden=[8])), 10)
    x = torch.bernoulli(torch.full((20, 10), 0.3), generator=torch.Generator().manual_seed(0))
    elbo = make_elbo(name)
    start = torch.get_rng_state()
    loss_fn = make_loss_fn(elbo, vae.model, vae.guide, (x,))
    assert loss_fn == elbo.differentiable_loss
    assert torch.equal(torch.get_rng_state(), start)  # the start-up check leaves no trace
    assert all(p.grad is None for p in vae.parameters())
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]
    assert torch.isfinite(loss_fn(vae.model, vae.guide, x))


def test_an_estimator_whose_value_disagrees_with_pyro_is_refused_at_start_up():
    class Shifted(MIWAE_ELBO):
        def log_weights(self, model, guide, args, kwargs):
            return super().log_weights(model, guide, args, kwargs) + 1e-2

    program = pair()
    with pytest.raises(LossMismatch, match="^Shifted reads this program differently from Pyro.s traces of it: "):
        make_loss_fn(Shifted(groups=2, num_particles=4, max_plate_nesting=1, vectorize_particles=True),
                     program.model, program.guide, (X,))


def test_make_elbo_refuses_options_where_they_do_not_apply():
    with pytest.raises(ValueError, match="groups applies to objectives miwae and piwae only; got groups=2 with "
                                         "objective 'iwae'"):
        make_elbo("iwae", groups=2)
    with pytest.raises(ValueError, match="ciwae_beta applies to objective 'ciwae' only; got ciwae_beta=0.3"):
        make_elbo("miwae", ciwae_beta=0.3)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        make_elbo("ciwae", ciwae_beta=1.5)
    with pytest.raises(ValueError, match="alpha applies to objective 'renyi' only; got alpha=0.5 with objective 'stl'"):
        make_elbo("stl", alpha=0.5)
    with pytest.raises(ValueError, match="iwae-dreg is the IWAE bound, alpha=0; got alpha=0.5"):
        make_elbo("iwae-dreg", alpha=0.5)
    with pytest.raises(ValueError, match="groups must be a positive integer, got 0"):
        make_elbo("piwae", groups=0)
    elbo = make_elbo("piwae", num_particles=4, groups=3)
    assert (elbo.num_particles, elbo.groups, elbo.vectorize_particles) == (12, 3, True)
    assert math.isclose(make_elbo("ciwae").beta, 0.5)
