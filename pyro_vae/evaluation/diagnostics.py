"""Latent and guide diagnostics: analytic KL, KL per dimension, active units, PSIS k-hat,
and posterior draws for ArviZ.

* **KL per dimension** -- for a factorized guide and prior (both
  ``Independent`` over the latent dimension, e.g. the diagonal Gaussian guide
  and ``N(0, I)`` prior) the KL splits into one closed-form term per dimension,
  the closed-form Gaussian KL of docs/derivations.md term by term.  For other pairs (full covariance, mixtures, flows)
  there is no per-dimension split: reported as n/a.
* **Active units** (Burda et al. 2015): unit ``u`` is active when
  ``A_u = Cov_x(E_q[z_u | x]) > 0.01``.  ``E_q[z | x]`` is the guide's
  ``mean`` where the distribution defines one, otherwise a Monte Carlo mean of
  :data:`MC_MEAN_SAMPLES` draws.
* **PSIS k-hat** (Vehtari et al. 2024; Yao et al. 2018 for variational
  guides): the shape of the generalized Pareto tail fitted to one point's
  importance weights ``p(x, z_k) / q(z_k | x)``; see :data:`KHAT_MEANING`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.kl import kl_divergence

from pyro_vae.evaluation import arviz_compat
from pyro_vae.evaluation.importance import program_device
from pyro_vae.infer import weights
from pyro_vae.train.program import Program, as_program
from pyro_vae.train.trainer import batch_args

ACTIVE_UNIT_THRESHOLD = 0.01
MC_MEAN_SAMPLES = 100
KHAT_GOOD = 0.5
KHAT_BAD = 0.7
MIN_KHAT_PARTICLES = 100
KHAT_MEANING = (
    "k-hat < 0.5: the importance weights have finite variance; the guide covers the posterior "
    "of that point and the importance-sampled log p(x) is reliable. "
    "0.5 <= k-hat < 0.7: infinite variance but a finite mean; the estimate converges slowly and "
    "PSIS-smoothed estimates are still usable. "
    "k-hat >= 0.7: the weights are so heavy-tailed that the estimate of log p(x) for that point "
    "is unreliable (typically biased low) even with thousands of particles: the guide is too "
    "narrow or misplaced there (Vehtari et al. 2024; Yao et al. 2018)."
)


# -- distributions of the latent site ---------------------------------------------------------

@dataclass
class LatentSite:
    """Guide and prior distributions of one latent site for a batch of points."""

    name: str
    guide: dist.Distribution
    prior: dist.Distribution


def latent_sites(program: Program, x: torch.Tensor, y: torch.Tensor | None = None) -> list[LatentSite]:
    """``q(z_s | ...)`` and ``p(z_s | ...)`` of every latent site ``s``, in the guide's order: one
    guide trace, the model replayed on it (one draw per point, no particle plate)."""
    program = as_program(program)
    with torch.no_grad():
        guide_trace, model_trace = weights.trace_pair(program.model, program.guide, *batch_args(x, y))
    return [LatentSite(name, site["fn"], model_trace.nodes[name]["fn"])
            for name, site in guide_trace.nodes.items()
            if weights.is_random_site(site) and not site["is_observed"]]


def analytic_kl(sites: list[LatentSite]) -> tuple[torch.Tensor | None, str | None]:
    """Closed-form ``KL(q || p)`` summed over latent sites, per point, or ``(None, reason)``
    naming the first site without a registered ``kl_divergence``."""
    total = None
    for site in sites:
        try:
            kl = kl_divergence(site.guide, site.prior)
        except NotImplementedError:
            return None, f"n/a (no analytic KL for site {site.name})"
        total = kl if total is None else total + kl
    return total, None


def _independent_base(d: dist.Distribution) -> dist.Distribution | None:
    """The per-dimension distribution of a ``(..., r)`` factorized latent, or None."""
    while isinstance(d, dist.ExpandedDistribution):
        d = d.base_dist
    if isinstance(d, dist.Independent) and d.reinterpreted_batch_ndims == 1:
        base = d.base_dist
        while isinstance(base, dist.ExpandedDistribution):
            base = base.base_dist
        return base
    return None


def kl_per_dimension(site: LatentSite) -> tuple[torch.Tensor | None, str | None]:
    """``(B, r)`` closed-form KL per latent dimension (term by term for Gaussians),
    or ``(None, reason)`` when guide or prior does not factorize over dimensions."""
    if len(site.guide.event_shape) != 1:  # e.g. (n, k) one-hot codes of categorical latents
        return None, (f"n/a (site {site.name} has event shape {tuple(site.guide.event_shape)}, "
                      "not one dimension per unit)")
    q, p = _independent_base(site.guide), _independent_base(site.prior)
    if q is None or p is None:
        return None, f"n/a (site {site.name}: guide and prior must both factorize over dimensions)"
    try:
        kl = kl_divergence(q, p)
    except NotImplementedError:
        return None, f"n/a (no analytic KL for the dimensions of site {site.name})"
    return kl.reshape(-1, kl.shape[-1]), None


def guide_mean(guide: dist.Distribution, num_samples: int = MC_MEAN_SAMPLES) -> tuple[torch.Tensor, str]:
    """``E_q[z | x]`` of shape ``(B, r)``: the distribution's ``mean`` when it has one, else the
    mean of ``num_samples`` draws.  Returns the mean and how it was obtained."""
    try:
        mean = guide.mean
        if torch.isfinite(mean).all():
            return mean.reshape(-1, guide.event_shape.numel()), "guide mean"
    except NotImplementedError:
        pass
    draws = guide.sample((num_samples,))
    return draws.mean(0).reshape(-1, guide.event_shape.numel()), f"Monte Carlo mean of {num_samples} guide draws"


# -- accumulating over a test set ----------------------------------------------------------------

@dataclass
class LatentDiagnostics:
    """Per-dimension KL, activity ``Cov_x(E_q[z_u])`` and the active-unit count over a data set."""

    latent_dim: int
    kl_per_dim: list[float] | None
    kl_per_dim_note: str | None
    activity: list[float]
    active_units: int
    threshold: float
    mean_method: str
    num_points: int
    event_shape: tuple[int, ...] = ()
    site: str = "z"

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "latent_dim": self.latent_dim,
            "kl_per_dim": self.kl_per_dim if self.kl_per_dim is not None else self.kl_per_dim_note,
            "activity": self.activity,
            "active_units": self.active_units,
            "active_unit_threshold": self.threshold,
            "guide_mean": self.mean_method,
            "num_points": self.num_points,
            "event_shape": list(self.event_shape),
        }

    def ranked_dimensions(self) -> list[int]:
        """Dimensions from most to least informative (by KL when known, else by activity)."""
        score = self.kl_per_dim if self.kl_per_dim is not None else self.activity
        return sorted(range(self.latent_dim), key=lambda j: -score[j])


class LatentAccumulator:
    """Collects one site's guide means and per-dimension KLs batch by batch (memory ``N x r``)."""

    def __init__(self, site_name: str, threshold: float = ACTIVE_UNIT_THRESHOLD) -> None:
        self.site_name = site_name
        self.threshold = threshold
        self.means: list[torch.Tensor] = []
        self.kl_sum: torch.Tensor | None = None
        self.kl_note: str | None = None
        self.mean_method = ""
        self.event_shape: tuple[int, ...] = ()
        self.count = 0

    def add(self, sites: list[LatentSite]) -> None:
        site = next((s for s in sites if s.name == self.site_name), None)
        if site is None:
            raise ValueError(f"the guide has no latent site {self.site_name!r}; "
                             f"its latent sites are {', '.join(s.name for s in sites)}")
        self.event_shape = tuple(site.guide.event_shape)
        mean, self.mean_method = guide_mean(site.guide)
        self.means.append(mean.detach().double().cpu())
        self.count += mean.shape[0]
        if self.kl_note is None:
            kl, self.kl_note = kl_per_dimension(site)
            if kl is not None:
                kl = kl.detach().double().sum(0).cpu()
                self.kl_sum = kl if self.kl_sum is None else self.kl_sum + kl

    def result(self) -> LatentDiagnostics:
        means = torch.cat(self.means)
        activity = active_unit_activity(means)
        kl = None if self.kl_note is not None or self.kl_sum is None else (self.kl_sum / self.count).tolist()
        return LatentDiagnostics(
            latent_dim=means.shape[1], kl_per_dim=kl, kl_per_dim_note=self.kl_note,
            activity=activity.tolist(), active_units=int((activity > self.threshold).sum()),
            threshold=self.threshold, mean_method=self.mean_method, num_points=self.count,
            event_shape=self.event_shape, site=self.site_name,
        )

    def guide_means(self) -> torch.Tensor:
        """``(N, r)`` guide means of every point added, in order."""
        return torch.cat(self.means)


class SiteAccumulators:
    """One :class:`LatentAccumulator` per latent site, created from the first batch, in guide order."""

    def __init__(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> None:
        self.threshold = threshold
        self.sites: dict[str, LatentAccumulator] = {}

    def add(self, sites: list[LatentSite]) -> None:
        if not self.sites:
            self.sites = {s.name: LatentAccumulator(s.name, self.threshold) for s in sites}
        for accumulator in self.sites.values():
            accumulator.add(sites)

    def results(self) -> dict[str, LatentDiagnostics]:
        return {name: acc.result() for name, acc in self.sites.items()}

    def guide_means(self) -> dict[str, torch.Tensor]:
        return {name: acc.guide_means() for name, acc in self.sites.items()}


def active_unit_activity(means: torch.Tensor) -> torch.Tensor:
    """``A_u = Cov_x(E_q[z_u | x])``: the variance over data points of each guide-mean
    coordinate, ``(r,)`` (Burda et al. 2015).  Needs at least two points."""
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(f"active units need guide means of shape (N >= 2, r), got {tuple(means.shape)}")
    return means.var(dim=0, correction=1)


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, torch.Tensor]:
    """Number of active units and the ``(r,)`` boolean mask ``A_u > threshold``."""
    mask = active_unit_activity(means) > threshold
    return int(mask.sum()), mask


# -- PSIS k-hat -------------------------------------------------------------------------------------

def khat_summary(khat: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Fractions of points above 0.5 and 0.7, quantiles, and what the thresholds mean."""
    k = np.asarray(khat, dtype=np.float64)
    if k.size == 0:
        raise ValueError("no k-hat values to summarize")
    finite = k[np.isfinite(k)]
    return {
        "num_points": int(k.size),
        "fraction_above_0.5": float(np.mean(k > KHAT_GOOD)),
        "fraction_above_0.7": float(np.mean(k > KHAT_BAD)),
        "median": float(np.median(k)),
        "max": float(np.max(k)),
        "mean_finite": float(finite.mean()) if finite.size else None,
        "backend": arviz_compat.khat_backend(),
        "meaning": KHAT_MEANING,
    }


# -- posterior draws for ArviZ ------------------------------------------------------------------------

@torch.no_grad()
def posterior_draws(program: Program, x: torch.Tensor, y: torch.Tensor | None = None,
                    num_samples: int = 1000) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``num_samples`` guide draws per point of every latent site, ``{site: (S, B, *event)}``,
    and their log importance weights ``log p(x, z) - log q(z | x)``, ``(S, B)``."""
    program = as_program(program)
    args = batch_args(x, y)
    device = program_device(program, *args)
    args = tuple(a.to(device) for a in args)
    guide_trace, model_trace = weights.trace_pair(program.model, program.guide, *args, num_particles=num_samples)
    draws = {}
    for name, site in guide_trace.nodes.items():
        if weights.is_random_site(site) and not site["is_observed"]:
            value = site["value"]
            event = site["fn"].event_shape
            draws[name] = value.reshape(num_samples, x.shape[0], *event)
    return draws, weights.weights_of_traces(guide_trace, model_trace).log_weight


def _event_dim_names(ndim: int) -> list[str]:
    """Names of the latent event dimensions: ``latent``; ``latent, category`` for the
    ``(n, k)`` one-hot codes of categorical latents; ``event_0, ...`` beyond."""
    if ndim == 1:
        return ["latent"]
    if ndim == 2:
        return ["latent", "category"]
    return [f"event_{i}" for i in range(ndim)]


def export_posterior(program: Program, x: torch.Tensor, y: torch.Tensor | None, indices: list[int],
                     path: str | Path, num_samples: int = 1000) -> Path:
    """Write guide draws for the test inputs ``x[indices]`` as ArviZ netCDF at ``path``.

    Group ``posterior``: one variable per latent site (``z`` with dims ``(chain,
    draw, point, latent)``; with several sites the event dimensions are
    prefixed by the site name), one chain of ``num_samples`` independent draws
    from the guide; categorical latents add a ``category`` dimension; group
    ``sample_stats``: ``log_importance_weight`` ``(chain, draw, point)``, which
    turns the draws into self-normalized importance samples of ``p(z | x)``;
    group ``constant_data``: the inputs ``x``.  Coordinate ``point`` holds the
    test-set indices.
    """
    if not indices:
        raise ValueError("export_posterior needs at least one test index")
    n = x.shape[0]
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"test indices {bad} are out of range; the test set has {n} points (0..{n - 1})")
    idx = torch.as_tensor(indices, dtype=torch.long)
    draws, log_w = posterior_draws(program, x[idx], None if y is None else y[idx], num_samples)
    posterior, coords, dims = {}, {}, {}
    for name, z in draws.items():
        prefix = "" if len(draws) == 1 else f"{name}_"
        event_dims = [prefix + d for d in _event_dim_names(z.dim() - 2)]
        posterior[name] = z.detach().cpu().double().numpy()[None]
        coords.update({d: list(range(size)) for d, size in zip(event_dims, z.shape[2:])})
        dims[name] = ["point", *event_dims]
    data = arviz_compat.to_inference_data(
        posterior=posterior,
        sample_stats={"log_importance_weight": log_w.detach().cpu().double().numpy()[None]},
        constant_data={"x": x[idx].detach().cpu().double().numpy()},
        coords={"point": list(indices), "feature": list(range(x.shape[-1])), **coords},
        dims={**dims, "log_importance_weight": ["point"], "x": ["point", "feature"]},
        attrs={"source": "pyro-vae guide q(z | x)",
               "note": "independent draws from the guide; weight draw s of point i by "
                       "softmax over s of log_importance_weight to target p(z | x)"},
    )
    return arviz_compat.save_netcdf(data, path)

