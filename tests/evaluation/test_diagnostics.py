"""Latent and guide diagnostics (pyro_vae.evaluation.diagnostics, pyro_vae.evaluation.arviz_compat): PSIS k-hat,
active units, KL per dimension, and the ArviZ export of guide draws."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import ExactPosteriorEncoder, LinearGaussianProblem

from pyro_vae.evaluation import arviz_compat
from pyro_vae.evaluation.diagnostics import (
    KHAT_MEANING,
    active_unit_activity,
    active_units,
    export_posterior,
    guide_mean,
    khat_summary,
    kl_per_dimension,
    latent_sites,
)
from pyro_vae.evaluation.evaluator import EvaluationOptions, evaluate_test_set
from pyro_vae.evaluation.importance import log_weights
from pyro_vae.models.guides import Encoder
from pyro_vae.models.vae import VAE


def _fresh(seed: int = 0) -> None:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()


class IgnoringEncoder(Encoder):
    """Diagonal guide from the exact posterior's mean and marginal scales, except that latent
    dimension ``ignored`` has a mean that does not depend on x."""

    def __init__(self, exact: ExactPosteriorEncoder, ignored: int) -> None:
        super().__init__()
        self.latent_dim = exact.latent_dim
        self.exact = exact
        self.ignored = ignored
        self.register_buffer("scale", exact.cov.diagonal().sqrt())

    def forward(self, x, y=None):
        loc = self.exact(x).loc.clone()
        loc[..., self.ignored] = 0.3
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(1)


def test_khat_is_low_for_the_exact_posterior_and_high_for_a_far_too_narrow_guide():
    problem = LinearGaussianProblem(data_dim=5, latent_dim=2, n=40, seed=0)
    summaries = {}
    for narrow in (1.0, 1.3, 0.1):
        _fresh(0)
        lw = log_weights(problem.vae("exact", narrow), problem.x, None, 2000).log_weight
        summaries[narrow] = khat_summary(arviz_compat.psis_khat(lw.T))
    assert summaries[1.0]["fraction_above_0.5"] == 0.0      # exact posterior: constant weights
    assert summaries[1.0]["max"] == -np.inf
    assert summaries[1.3]["fraction_above_0.5"] == 0.0      # over-dispersed: bounded weights
    assert summaries[1.3]["max"] < 0.3
    assert summaries[0.1]["fraction_above_0.7"] >= 0.9      # far too narrow: heavy tails
    assert summaries[0.1]["median"] > 0.7
    assert summaries[0.1]["meaning"] == KHAT_MEANING


def test_evaluation_reports_khat_fractions_per_point():
    _fresh(1)
    problem = LinearGaussianProblem(n=20, seed=1)
    result = evaluate_test_set(problem.vae("exact", 0.1), problem.x, options=EvaluationOptions(num_particles=1000))
    assert result.khat.shape == (20,)
    psis = result.summary()["psis"]
    assert psis["fraction_above_0.7"] == pytest.approx(np.mean(result.khat > 0.7))
    assert psis["num_points"] == 20 and psis["fraction_above_0.7"] > 0.8


def test_pyro_fallback_khat_agrees_with_arviz():
    _fresh(2)
    problem = LinearGaussianProblem(n=6, seed=2)
    lw = torch.cat([log_weights(problem.vae("exact", s), problem.x, None, 1500).log_weight.T
                    for s in (0.2, 0.6, 0.9, 1.2)])
    from_arviz = arviz_compat.psis_khat(lw, backend="arviz")
    from_pyro = arviz_compat.psis_khat(lw, backend="pyro")
    np.testing.assert_allclose(from_pyro, from_arviz, atol=1e-6)
    assert from_arviz.min() < 0.0 < 0.7 < from_arviz.max()  # the range covers both regimes
    np.testing.assert_allclose(arviz_compat.psis_khat(lw), from_arviz, rtol=1e-12, atol=1e-12)
    assert arviz_compat.khat_backend().startswith("numpy")


def test_psis_khat_rejects_bad_shapes_and_backends():
    with pytest.raises(ValueError, match=r"shape \(points, particles\), got shape \(10,\)"):
        arviz_compat.psis_khat(np.zeros(10))
    with pytest.raises(ValueError, match="more particles per point than 3"):
        arviz_compat.psis_khat(np.random.default_rng(0).normal(size=(2, 3)))
    with pytest.raises(ValueError, match="unknown k-hat backend 'stan'"):
        arviz_compat.psis_khat(np.random.default_rng(0).normal(size=(2, 300)), backend="stan")


def test_an_encoder_that_ignores_a_dimension_has_that_unit_inactive():
    _fresh(3)
    problem = LinearGaussianProblem(data_dim=6, latent_dim=3, n=200, seed=3)
    base = problem.vae("exact")
    vae = VAE(base.prior, IgnoringEncoder(base.encoder, ignored=1), base.decoder)
    result = evaluate_test_set(vae, problem.x, options=EvaluationOptions(num_particles=8, khat=False))
    latent = result.latent
    assert latent.active_units == 2
    assert latent.activity[1] < 1e-12
    assert latent.activity[0] > 0.1 and latent.activity[2] > 0.1
    assert latent.mean_method == "guide mean"
    # The ignored dimension still has a KL: N(0.3, s^2) against N(0, 1), the same for every x.
    s2 = base.encoder.cov.diagonal()[1]
    expected = 0.5 * (0.3**2 + s2 - torch.log(s2) - 1.0)
    assert latent.kl_per_dim[1] == pytest.approx(expected.item(), rel=1e-9)
    ranked = latent.ranked_dimensions()
    assert sorted(ranked) == [0, 1, 2]
    assert [latent.kl_per_dim[j] for j in ranked] == sorted(latent.kl_per_dim, reverse=True)


def test_active_units_threshold_and_errors():
    means = torch.stack([torch.linspace(-1, 1, 50), 0.05 * torch.linspace(-1, 1, 50), torch.zeros(50)], 1)
    count, mask = active_units(means)
    assert count == 1 and mask.tolist() == [True, False, False]  # var of 0.05*U(-1,1) grid is < 0.01
    count, _ = active_units(means, threshold=1e-4)
    assert count == 2
    with pytest.raises(ValueError, match=r"\(N >= 2, r\), got \(1, 3\)"):
        active_unit_activity(means[:1])


def test_kl_per_dimension_is_eq6_term_by_term():
    _fresh(4)
    problem = LinearGaussianProblem(n=10, seed=4)
    vae = problem.vae("mlp")
    (site,) = latent_sites(vae, problem.x)
    kl, note = kl_per_dimension(site)
    assert note is None and kl.shape == (10, 2)
    loc, log_var = vae.encoder.encode(problem.x)
    expected = 0.5 * (loc.pow(2) + log_var.exp() - log_var - 1.0)
    torch.testing.assert_close(kl, expected.detach())
    (full,) = latent_sites(problem.vae("exact"), problem.x)
    kl, note = kl_per_dimension(full)
    assert kl is None and note.startswith("n/a (site z: guide and prior must both factorize")


def test_guide_mean_falls_back_to_monte_carlo_without_a_closed_form():
    _fresh(5)
    base = dist.Normal(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.3, 0.2]]))
    lognormal = dist.TransformedDistribution(base, [dist.transforms.ExpTransform()]).to_event(1)
    mean, how = guide_mean(lognormal, num_samples=20000)
    assert how == "Monte Carlo mean of 20000 guide draws"
    expected = torch.exp(base.loc + base.scale**2 / 2)
    torch.testing.assert_close(mean, expected, atol=0.02, rtol=0)
    mean, how = guide_mean(dist.Normal(torch.ones(3, 2), 1.0).to_event(1))
    assert how == "guide mean" and torch.equal(mean, torch.ones(3, 2))


def test_posterior_export_round_trips_through_netcdf(tmp_path):
    _fresh(6)
    problem = LinearGaussianProblem(n=12, seed=6)
    path = export_posterior(problem.vae("exact"), problem.x, None, [0, 5, 11], tmp_path / "posterior.nc",
                            num_samples=64)
    data = arviz_compat.load_netcdf(path)
    z = data.posterior["z"]
    assert z.shape == (1, 64, 3, 2)
    assert list(data.posterior["point"].values) == [0, 5, 11]
    # With the exact posterior as the guide every draw's weight is p(x) itself.
    weights = data.sample_stats["log_importance_weight"].values[0]
    expected = problem.log_evidence()[[0, 5, 11]].numpy()
    np.testing.assert_allclose(weights, np.broadcast_to(expected, weights.shape), atol=1e-9)
    np.testing.assert_allclose(data.constant_data["x"].values, problem.x[[0, 5, 11]].numpy())
    # The draws follow the exact posterior of point 5.
    exact = problem.vae("exact").encoder(problem.x[5:6])
    assert np.abs(z.values[0, :, 1].mean(0) - exact.loc[0].numpy()).max() < 0.5


def test_posterior_export_names_out_of_range_indices(tmp_path):
    problem = LinearGaussianProblem(n=4)
    with pytest.raises(ValueError, match=r"test indices \[4, 9\] are out of range; the test set has 4 points"):
        export_posterior(problem.vae("exact"), problem.x, None, [1, 4, 9], tmp_path / "p.nc")


def test_categorical_latents_count_every_category_as_a_unit_and_skip_per_dim_kl():
    """A (num_latents, num_categories) event is n*k units for active-unit counting, and has no
    per-dimension KL; the batch must not be mixed into the latent axis."""
    import pyro

    from pyro_vae.evaluation.diagnostics import (
        guide_mean,
        kl_per_dimension,
        latent_sites,
    )
    from pyro_vae.models.registry import build_vae
    from pyro_vae.train.config import TrainConfig

    pyro.set_rng_seed(0)
    vae = build_vae(TrainConfig.from_flat(dict(prior="categorical", guide="categorical", latent_dim=4, num_categories=5,
                                hidden=[8])), 6).eval()
    x = torch.rand(7, 6).round()
    site = latent_sites(vae, x)[0]
    mean, _ = guide_mean(site.guide)
    assert mean.shape == (7, 20)
    kl, reason = kl_per_dimension(site)
    assert kl is None and "event shape (4, 5)" in reason
