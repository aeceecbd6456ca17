"""The objectives against exact answers on a linear-Gaussian VAE, and against each other."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussianProblem
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_vae.infer.kl import gaussian_kl_to_standard_normal
from pyro_vae.infer.objectives import (
    OBJECTIVES,
    DifferentiableRenyiELBO,
    analytic_kl_sites,
    make_elbo,
    warn_about_monte_carlo_kl,
)

OBJECTIVE_ARGS = {
    "trace": dict(num_particles=1),
    "meanfield": dict(num_particles=1),
    "renyi": dict(num_particles=5, alpha=0.5),
    "iwae": dict(num_particles=5),
    "iwae-dreg": dict(num_particles=5),
    "stl": dict(num_particles=1),
    "miwae": dict(num_particles=3, groups=2),
    "ciwae": dict(num_particles=5, ciwae_beta=0.5),
    "piwae": dict(num_particles=3, groups=2),
}


def per_point_bound(elbo, vae, x, repeats=100):
    """Average of ``repeats`` loss draws, as a per-point bound with its standard error."""
    with torch.no_grad():
        draws = torch.tensor([-float(elbo.differentiable_loss(vae.model, vae.guide, x)) / x.shape[0]
                              for _ in range(repeats)], dtype=torch.float64)
    return draws.mean().item(), draws.std().item() / math.sqrt(repeats)


@pytest.fixture
def problem():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    return LinearGaussianProblem(n=32)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_bound_lies_below_exact_log_evidence(problem, name):
    vae = problem.vae("mlp")
    exact = problem.log_evidence().mean().item()
    bound, se = per_point_bound(make_elbo(name, **OBJECTIVE_ARGS[name]), vae, problem.x)
    assert bound <= exact + 3 * se
    assert bound < exact - 0.1  # an untrained guide leaves a real gap


def test_iwae_bound_increases_with_k(problem):
    vae = problem.vae("mlp")
    bounds = [per_point_bound(make_elbo("iwae", num_particles=k), vae, problem.x, repeats=50)
              for k in (1, 5, 50)]
    for (low, se_low), (high, se_high) in zip(bounds, bounds[1:]):
        assert high > low + 2 * math.hypot(se_low, se_high)
    assert bounds[-1][0] <= problem.log_evidence().mean().item()


@pytest.mark.parametrize("name", OBJECTIVES)
def test_exact_posterior_guide_makes_every_bound_tight(problem, name):
    vae = problem.vae("exact")
    exact = problem.log_evidence().mean().item()
    bound, se = per_point_bound(make_elbo(name, **OBJECTIVE_ARGS[name]), vae, problem.x, repeats=30)
    if name == "meanfield":
        # pyro_vae.infer.kl registers KL(MultivariateNormal || diagonal Normal): the bound is then
        # E_q[log p(x|z)] - KL, whose one-sample estimate has variance; it is tight in expectation.
        assert analytic_kl_sites(vae.model, vae.guide, problem.x) == {"z": True}
        assert abs(bound - exact) < 3 * se + 1e-6
    else:  # every log-weight log p(x, z) - log q(z | x) equals log p(x): zero variance
        assert bound == pytest.approx(exact, abs=1e-6)


def test_trace_and_meanfield_agree_in_expectation(problem):
    """On the same draw the two losses differ by the Monte Carlo KL's error, log q(z) - log p(z) - KL,
    which averages to zero: the same bound, the analytic KL only removes that noise."""
    vae = problem.vae("mlp")
    assert analytic_kl_sites(vae.model, vae.guide, problem.x) == {"z": True}
    trace, meanfield = make_elbo("trace"), make_elbo("meanfield")
    differences = []
    with torch.no_grad():
        for seed in range(100):
            pyro.set_rng_seed(seed)
            t = float(trace.differentiable_loss(vae.model, vae.guide, problem.x))
            pyro.set_rng_seed(seed)
            m = float(meanfield.differentiable_loss(vae.model, vae.guide, problem.x))
            differences.append((t - m) / problem.x.shape[0])
    differences = torch.tensor(differences, dtype=torch.float64)
    se = differences.std().item() / math.sqrt(len(differences))
    assert abs(differences.mean().item()) < 3 * se
    assert differences.std().item() > 1e-3  # the Monte Carlo KL is noisy; the analytic one is not


def test_meanfield_loss_is_reconstruction_minus_closed_form_kl_on_the_same_draw():
    pyro.set_rng_seed(0)
    from pyro_vae.infer.scale import latent_scale
    from pyro_vae.models.registry import build_vae
    from pyro_vae.train.config import TrainConfig

    vae = build_vae(TrainConfig.from_flat(dict(latent_dim=3, hidden=[8])), 6)
    x = torch.rand(4, 6).round()
    pyro.set_rng_seed(1)
    with latent_scale(scale=0.3):
        loss = make_elbo("meanfield").differentiable_loss(vae.model, vae.guide, x)
    loc, log_var = vae.encoder.encode(x)
    pyro.set_rng_seed(1)
    z = vae.encoder(x).rsample()
    recon = vae.decoder(z).log_prob(x)
    expected = -(recon - 0.3 * gaussian_kl_to_standard_normal(loc, (0.5 * log_var).exp())).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_reparameterized_trace_gradient_matches_closed_form():
    """d/dmu E_q[log N(x; z, 1) + log N(z; 0, 1) - log q(z)] with q = N(mu, s^2):
    the ELBO is -((x-mu)^2 + s^2)/2 - (mu^2 + s^2)/2 + log s + const, so
    dELBO/dmu = x - 2 mu and dELBO/dlog s = 1 - 2 s^2."""
    x = torch.tensor(1.5)
    mu = torch.tensor(0.3, requires_grad=True)
    log_s = torch.tensor(-0.4, requires_grad=True)

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        pyro.sample("z", dist.Normal(mu, log_s.exp()))

    pyro.set_rng_seed(0)
    loss = Trace_ELBO(num_particles=50_000, vectorize_particles=True, max_plate_nesting=0) \
        .differentiable_loss(model, guide)
    d_mu, d_log_s = torch.autograd.grad(-loss, [mu, log_s])
    s2 = (2 * log_s).exp().item()
    assert d_mu.item() == pytest.approx(x.item() - 2 * mu.item(), abs=0.02)
    assert d_log_s.item() == pytest.approx(1 - 2 * s2, abs=0.02)


@pytest.mark.parametrize("alpha,k", [(0.0, 5), (0.5, 3), (2.0, 4)])
def test_differentiable_renyi_loss_equals_pyro_renyi_on_the_same_draws(problem, alpha, k):
    vae = problem.vae("mlp")
    ours = DifferentiableRenyiELBO(alpha=alpha, num_particles=k, max_plate_nesting=1, vectorize_particles=True)
    pyros = RenyiELBO(alpha=alpha, num_particles=k, max_plate_nesting=1, vectorize_particles=True)
    pyro.set_rng_seed(7)
    a = ours.differentiable_loss(vae.model, vae.guide, problem.x)
    pyro.set_rng_seed(7)
    b = pyros.loss(vae.model, vae.guide, problem.x)
    assert a.item() == pytest.approx(b, rel=1e-9)
    assert a.requires_grad


def test_differentiable_renyi_gradient_equals_pyro_surrogate(problem):
    vae = problem.vae("mlp")
    params = list(vae.encoder.parameters())
    pyro.set_rng_seed(3)
    ours = make_elbo("iwae", num_particles=4).differentiable_loss(vae.model, vae.guide, problem.x)
    grads = torch.autograd.grad(ours, params)
    pyro.set_rng_seed(3)
    pyro.clear_param_store()
    RenyiELBO(alpha=0, num_particles=4, max_plate_nesting=1, vectorize_particles=True) \
        .loss_and_grads(vae.model, vae.guide, problem.x)
    for g, p in zip(grads, params):
        assert torch.allclose(g, p.grad, atol=1e-10)


def test_make_elbo_rejects_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown objective 'elbo'.*trace, meanfield, renyi, iwae"):
        make_elbo("elbo")
    with pytest.raises(ValueError, match="needs alpha"):
        make_elbo("renyi")
    with pytest.raises(ValueError, match="alpha=1"):
        make_elbo("renyi", alpha=1)
    with pytest.raises(ValueError, match="alpha=0"):
        make_elbo("iwae", alpha=0.5)
    with pytest.raises(ValueError, match="positive integer"):
        make_elbo("trace", num_particles=0)


def test_objectives_vectorize_several_particles():
    for name in OBJECTIVES:
        elbo = make_elbo(name, num_particles=3, alpha=0.5 if name == "renyi" else None)
        # Pyro adds the particle plate to the data plate: nesting 1 + 1; miwae/piwae draw M groups of 3
        draws = 3 * getattr(elbo, "groups", 1)
        assert elbo.vectorize_particles and elbo.num_particles == draws and elbo.max_plate_nesting == 2


def test_monte_carlo_fallback_is_reported_and_warned():
    def model():
        pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(torch.zeros(2), 1.0)))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    report = analytic_kl_sites(model, guide)
    assert report == {"z": False}
    with pytest.warns(UserWarning, match="no analytic KL.*site\\(s\\) z"):
        warn_about_monte_carlo_kl(report)
