"""Importance-sampled log-likelihood and the bounds beside it (pyro_vae.evaluation.importance, pyro_vae.evaluation.evaluator).

The linear-Gaussian VAE of ``tests/linear_gaussian.py`` has an exact ``log p(x)``,
so the estimator is checked against the truth, not against itself.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import ExactPosteriorEncoder, LinearGaussianProblem
from torch.distributions import constraints

from pyro_vae.evaluation.evaluator import (
    EvaluationOptions,
    bounds_from_log_weights,
    evaluate_test_set,
    per_point_bounds,
    summarize,
)
from pyro_vae.evaluation.importance import (
    collect_log_weights,
    estimate_bytes_per_pair,
    importance_log_likelihood,
    log_weights,
    plan_chunks,
)
from pyro_vae.infer.bounds import StreamingLogMeanExp, grouped_iwae_bound, renyi_bound
from pyro_vae.infer.kl import gaussian_kl_to_standard_normal
from pyro_vae.models.guides import Encoder
from pyro_vae.models.registry import build_vae
from pyro_vae.models.vae import VAE
from pyro_vae.train.config import TrainConfig


def _fresh(seed: int = 0) -> None:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()


# -- a guide whose draws do not depend on how the work is chunked --------------------------------

class TableNoise:
    """Draw ``j`` of the point ``x`` is row ``j`` of a fixed table seeded by ``x``: the same
    numbers whether a point's particles come in one trace or in many."""

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim
        self.tables: dict[tuple, torch.Tensor] = {}
        self.used: dict[tuple, int] = {}

    def draws(self, x: torch.Tensor, num: int) -> torch.Tensor:
        out = []
        for row in x:
            key = tuple(round(v, 12) for v in row.tolist())
            start = self.used.get(key, 0)
            self.used[key] = start + num
            table = self.tables.get(key)
            if table is None or table.shape[0] < start + num:
                g = torch.Generator().manual_seed(hash(key) % 2**31)
                table = torch.randn(start + num + 8192, self.latent_dim, generator=g, dtype=x.dtype)
                self.tables[key] = table
            out.append(table[start:start + num])
        return torch.stack(out, dim=1)  # (num, B, r)


class TableNormal(dist.TorchDistribution):
    """Diagonal normal whose reparameterized draws come from a :class:`TableNoise`."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc, scale, x, noise, batch_shape=None):
        self.loc, self.scale, self.x, self.noise = loc, scale, x, noise
        super().__init__(torch.Size(batch_shape or loc.shape[:-1]), loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return TableNormal(self.loc, self.scale, self.x, self.noise, torch.Size(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        num = self.batch_shape.numel() // self.loc.shape[0]
        eps = self.noise.draws(self.x, num).reshape(*self.batch_shape, -1)
        return self.loc + self.scale * eps

    def log_prob(self, value):
        return dist.Normal(self.loc, self.scale).log_prob(value).sum(-1)

    @property
    def mean(self):
        return self.loc.expand(*self.batch_shape, -1)


class TableEncoder(Encoder):
    """The exact posterior's mean with a too-narrow diagonal scale, drawn from a noise table."""

    def __init__(self, exact: ExactPosteriorEncoder, noise: TableNoise, shrink: float = 0.6) -> None:
        super().__init__()
        self.latent_dim = exact.latent_dim
        self.exact = exact
        self.noise = noise
        self.register_buffer("scale", exact.cov.diagonal().sqrt() * shrink)

    def forward(self, x, y=None):
        loc = self.exact(x).loc
        return TableNormal(loc, self.scale.expand_as(loc), x, self.noise)


def table_vae(problem: LinearGaussianProblem) -> VAE:
    base = problem.vae("exact")
    encoder = TableEncoder(base.encoder, TableNoise(base.latent_dim))
    return VAE(base.prior, encoder, base.decoder)


# -- tests ---------------------------------------------------------------------------------------------

def test_importance_sampled_log_likelihood_matches_exact_evidence_and_exceeds_the_elbo():
    _fresh(0)
    problem = LinearGaussianProblem(data_dim=5, latent_dim=2, sigma=0.5, n=64, seed=1)
    vae = problem.vae("exact", narrow=1.5)  # a wider-than-exact guide: a good, but not perfect, proposal
    result = evaluate_test_set(vae, problem.x, options=EvaluationOptions(num_particles=5000, khat=False))
    exact = problem.log_evidence()
    estimate = result.estimate("log_px")
    assert abs(estimate.mean - exact.mean().item()) < 3 * estimate.stderr
    # Paired over the same points the comparison is far stricter than the spread over points.
    diff = summarize(result.per_point["log_px"] - exact)
    assert abs(diff.mean) < 3 * diff.stderr + 1e-3
    elbo = result.per_point["elbo"]
    assert torch.all(result.per_point["log_px"] >= elbo)
    gap = result.estimate("gap")
    assert gap.mean > 0.05 and gap.mean > 10 * gap.stderr  # the guide is not exact: a real gap
    # The gap estimates KL(q || p(z|x)) (docs/derivations.md, (D7)): exact ELBO is log p(x) - gap.
    assert abs((exact - elbo).mean().item() - gap.mean) < 0.02


def test_exact_posterior_guide_makes_every_bound_tight():
    _fresh(0)
    problem = LinearGaussianProblem(n=16, seed=2)
    result = evaluate_test_set(problem.vae("exact"), problem.x, options=EvaluationOptions(num_particles=200))
    exact = problem.log_evidence()
    for name in ("log_px", "elbo", "iwae_1", "iwae_5", "iwae_50", "renyi_0.5", "renyi_2"):
        torch.testing.assert_close(result.per_point[name], exact, atol=1e-9, rtol=0)


def test_chunked_and_unchunked_evaluation_agree():
    problem = LinearGaussianProblem(data_dim=5, latent_dim=2, n=23, seed=3)
    options = dict(num_particles=600, iwae_ks=(1, 5, 50), renyi_alphas=(0.5, 2.0))
    whole = evaluate_test_set(table_vae(problem), problem.x, options=EvaluationOptions(**options))
    tiny = EvaluationOptions(**options, max_memory_mb=0.02)
    chunked = evaluate_test_set(table_vae(problem), problem.x, options=tiny)
    assert whole.plan.num_traces == 1
    assert chunked.plan.particles_per_trace < 600 and chunked.plan.num_traces > 23
    assert whole.per_point.keys() == chunked.per_point.keys()
    for name in whole.per_point:
        torch.testing.assert_close(chunked.per_point[name], whole.per_point[name], atol=1e-10, rtol=0)
    assert chunked.khat == pytest.approx(whole.khat, abs=1e-9)
    assert chunked.latent.activity == pytest.approx(whole.latent.activity, abs=1e-12)


def test_streaming_log_likelihood_equals_one_shot_logsumexp():
    problem = LinearGaussianProblem(n=7, seed=4)
    reference = log_weights(table_vae(problem), problem.x, None, 900).log_weight
    expected = torch.logsumexp(reference, 0) - math.log(900)
    streamed = importance_log_likelihood(table_vae(problem), problem.x, num_particles=900, max_memory_mb=0.05)
    torch.testing.assert_close(streamed, expected, atol=1e-10, rtol=0)
    collected = collect_log_weights(table_vae(problem), problem.x, num_particles=900, max_memory_mb=0.05)
    torch.testing.assert_close(collected.log_weight, reference, atol=1e-12, rtol=0)


def test_streaming_log_mean_exp_handles_uneven_chunks_and_minus_infinity():
    g = torch.Generator().manual_seed(0)
    a = 30 * torch.randn(103, 6, generator=g, dtype=torch.float64)
    a[:50, 2] = -math.inf  # a point whose early particles have zero weight
    a[:, 4] = -math.inf    # a point with zero weight everywhere
    acc = StreamingLogMeanExp()
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 103)):
        acc.update(a[start:stop])
    expected = torch.logsumexp(a, 0) - math.log(103)
    torch.testing.assert_close(acc.result(), expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="no chunks"):
        StreamingLogMeanExp().result()


def test_bounds_are_ordered_on_the_same_draws():
    _fresh(5)
    problem = LinearGaussianProblem(n=32, seed=5)
    parts = log_weights(problem.vae("mlp"), problem.x, None, 5000)
    b = bounds_from_log_weights(parts, iwae_ks=(1, 5, 50, 5000), renyi_alphas=(2.0, 0.5, -1.0))
    torch.testing.assert_close(b["iwae_1"], b["elbo"])
    torch.testing.assert_close(b["iwae_5000"], b["log_px"])
    assert torch.all(b["renyi_2"] <= b["elbo"] + 1e-9)
    assert torch.all(b["elbo"] <= b["renyi_0.5"] + 1e-9)
    assert torch.all(b["renyi_0.5"] <= b["log_px"] + 1e-9)
    assert torch.all(b["renyi_-1"] >= b["log_px"] - 1e-9)  # alpha < 0 is not a lower bound
    assert torch.all(b["iwae_5"] <= b["iwae_50"] + 1e-9) and torch.all(b["iwae_50"] <= b["log_px"] + 1e-9)
    assert (b["iwae_5"] - b["elbo"]).mean() > 0.1  # the untrained guide leaves room to tighten
    torch.testing.assert_close(b["reconstruction"] - b["kl"], b["elbo"])


def test_iwae_and_renyi_helpers_follow_their_formulas():
    lw = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 0.5], [-3.0, 0.0]], dtype=torch.float64)
    two = (torch.logsumexp(lw[:2], 0) - math.log(2) + torch.logsumexp(lw[2:], 0) - math.log(2)) / 2
    torch.testing.assert_close(grouped_iwae_bound(lw, 2), two)
    torch.testing.assert_close(grouped_iwae_bound(lw, 3), torch.logsumexp(lw[:3], 0) - math.log(3))
    half = 2 * (torch.logsumexp(0.5 * lw, 0) - math.log(4))
    torch.testing.assert_close(renyi_bound(lw, 0.5), half)
    with pytest.raises(ValueError, match="k=5"):
        grouped_iwae_bound(lw, 5)
    with pytest.raises(ValueError, match="alpha=1"):
        renyi_bound(lw, 1.0)


def test_analytic_kl_elbo_for_the_diagonal_gaussian_guide():
    _fresh(6)
    problem = LinearGaussianProblem(n=40, seed=6)
    vae = problem.vae("mlp")
    result = evaluate_test_set(vae, problem.x, options=EvaluationOptions(num_particles=2000, khat=False))
    loc, log_var = vae.encoder.encode(problem.x)
    torch.testing.assert_close(result.per_point["kl_analytic"], gaussian_kl_to_standard_normal(loc, (0.5 * log_var).exp()).detach())
    mc, exact = result.per_point["kl"], result.per_point["kl_analytic"]
    se = (mc - exact).std() / math.sqrt(mc.numel())
    assert abs((mc - exact).mean()) < 4 * se + 1e-3
    summary = result.summary()
    assert summary["elbo_analytic_kl"]["mean"] == pytest.approx(result.estimate("elbo_analytic").mean)


def test_analytic_kl_of_a_full_covariance_guide_matches_the_closed_form():
    _fresh(7)
    problem = LinearGaussianProblem(n=8, seed=7)
    vae = problem.vae("exact", 0.7)
    result = evaluate_test_set(vae, problem.x, options=EvaluationOptions(num_particles=50))
    q = vae.encoder(problem.x)
    cov = q.covariance_matrix
    expected = 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + q.loc.pow(2).sum(-1) - 2 - torch.logdet(cov))
    torch.testing.assert_close(result.per_point["kl_analytic"], expected)
    summary = result.summary()
    assert summary["psis"].startswith("n/a (PSIS k-hat needs at least 100")
    assert set(summary["iwae"]) == {"1", "5", "50"}  # k=5000 > K is left out


def test_analytic_kl_is_reported_unavailable_when_none_is_registered():
    problem = LinearGaussianProblem(n=8, seed=7)
    result = evaluate_test_set(table_vae(problem), problem.x, options=EvaluationOptions(num_particles=50))
    summary = result.summary()
    assert summary["elbo_analytic_kl"] == "n/a (no analytic KL for site z)"
    assert summary["kl_analytic"] == "n/a (no analytic KL for site z)"
    assert "kl_analytic" not in result.per_point and "elbo_analytic" not in result.per_point
    assert summary["latent"]["kl_per_dim"].startswith("n/a")


def test_evaluation_is_reproducible_from_the_seed():
    problem = LinearGaussianProblem(n=12, seed=8)
    vae = problem.vae("mlp")
    _fresh(8)
    reference = evaluate_test_set(vae, problem.x, options=EvaluationOptions(num_particles=300)).per_point
    _fresh(8)
    again = evaluate_test_set(vae, problem.x, options=EvaluationOptions(num_particles=300)).per_point
    for name in reference:
        torch.testing.assert_close(again[name], reference[name])


def test_conditional_vae_is_evaluated_with_its_labels():
    _fresh(9)
    config = TrainConfig.from_flat(dict(latent_dim=2, hidden=[8], conditional=True))
    vae = build_vae(config, 6, 3)
    x = torch.bernoulli(torch.full((10, 6), 0.4))
    y = torch.arange(10) % 3
    bounds = per_point_bounds(vae, x, y, num_particles=64)
    assert bounds["iwae"].shape == (10,) and torch.all(bounds["iwae"] >= bounds["elbo"])
    with pytest.raises(ValueError, match="conditional"):
        per_point_bounds(vae, x, None, num_particles=4)


def test_chunk_plan_respects_the_memory_budget():
    problem = LinearGaussianProblem(data_dim=5, latent_dim=2)
    vae = problem.vae("mlp")
    per_pair = estimate_bytes_per_pair(vae, 5, torch.float64)
    for budget_mb, particles in ((0.01, 5000), (1.0, 5000), (64.0, 5000), (0.5, 7)):
        plan = plan_chunks(vae, 1000, particles, 5, budget_mb, torch.float64)
        assert plan.particles_per_trace * plan.points_per_trace * per_pair <= max(budget_mb * 2**20, per_pair)
        splits = math.ceil(particles / plan.particles_per_trace)
        assert splits * plan.particles_per_trace - particles < splits  # near-equal particle chunks
        assert plan.group_points % plan.points_per_trace == 0 or plan.group_points == 1000
    assert plan_chunks(vae, 1000, 7, 5, 0.5, torch.float64).particles_per_trace == 7


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_particles=0), "num_particles must be a positive integer, got 0"),
    (dict(num_particles=10, max_memory_mb=0), "max_memory_mb must be positive, got 0"),
    (dict(num_particles=10, renyi_alphas=(1.0,)), "alpha=1"),
    (dict(num_particles=10, iwae_ks=(0, 5)), r"positive integers, got \[0\]"),
])
def test_bad_options_are_named(kwargs, message):
    problem = LinearGaussianProblem(n=4)
    with pytest.raises(ValueError, match=message):
        evaluate_test_set(problem.vae("mlp"), problem.x, options=EvaluationOptions(**kwargs))
