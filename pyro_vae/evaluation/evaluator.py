"""Test-set bounds side by side, from one set of importance draws per data point.

For every test point, ``K`` draws ``z_k ~ q(z | x)`` give log-weights
``log w_k = log p(x, z_k) - log q(z_k | x)`` (:mod:`pyro_vae.evaluation.importance`, via
Pyro traces, so any prior/guide/decoder works).  From the same ``(K,)`` draws:

* ``log p(x)``: the IWAE estimator with all ``K`` draws, ``log (1/K) sum_k w_k``
  (Burda et al. 2016 use ``K = 5000``);
* ELBO (Kingma & Welling 2014), Monte Carlo: ``mean_k log w_k``, with its split into
  reconstruction ``mean_k log p(x | z_k)`` and KL ``-mean_k log p(z_k)/q(z_k|x)``;
* ELBO with analytic KL (docs/derivations.md): ``mean_k log p(x | z_k) - KL(q || p)`` where
  ``kl_divergence`` is registered for every latent site, else n/a;
* KL per latent site (Monte Carlo, ``-mean_k log p(z_s | ...)/q(z_s | ...)``) when
  the program has several latent sites;
* IWAE bound for each ``k`` in ``iwae_ks`` (``k <= K``): averaged over the
  ``floor(K / k)`` disjoint groups of ``k`` draws, so all bounds *share the
  same draws* (and differences between them are less noisy than independent runs);
* Renyi bound (Li & Turner 2016) ``1/(1-a) log (1/K) sum_k w_k^(1-a)``: a power
  mean of the weights, so for ``a >= 0`` it is at most the IWAE estimate on the
  same draws (a stochastic lower bound on ``log p(x)``); ``0 < a < 1`` lies between
  the ELBO and IWAE, ``a > 1`` below the ELBO; ``a < 0`` is *not* a lower bound;
* the gap ``log p(x) - ELBO``, the amortized posterior gap
  ``KL(q(z|x) || p(z|x))`` (the KL identity of docs/derivations.md; the estimate is
  itself slightly low because ``log p(x)`` is);
* latent diagnostics and PSIS k-hat (:mod:`pyro_vae.evaluation.diagnostics`).

Every figure is reported as a mean over points with its standard error.

The draws of every point depend only on a base seed (``EvaluationOptions.seed``,
else one drawn from torch's generator, so ``pyro.set_rng_seed`` fixes it), the
point's index and the chunk plan, and the per-point figures are computed block
by block: a distributed evaluation (each rank takes whole blocks of points, the
per-point results are gathered) gives the numbers of one process with the
same plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pyro_vae.evaluation import arviz_compat, diagnostics
from pyro_vae.evaluation.importance import (
    DEFAULT_MAX_MEMORY_MB,
    ChunkPlan,
    LogWeights,
    iter_point_groups,
    plan_chunks,
    program_device,
)
from pyro_vae.train.distributed import World, mix_seed, shard_bounds
from pyro_vae.infer.bounds import (
    elbo_bound,
    grouped_iwae_bound,
    iwae_bound,
    renyi_bound,
)
from pyro_vae.train.program import as_program
from pyro_vae.train.trainer import batch_args

DEFAULT_PARTICLES = 5000
DEFAULT_IWAE_KS = (1, 5, 50, 5000)
DEFAULT_RENYI_ALPHAS = (0.5, 2.0)
#: The stream of the latent diagnostics' draws (a particle index no trace has).
LATENT_STREAM = -1


@dataclass
class Estimate:
    """Mean over data points, its standard error, and the number of points (nats)."""

    mean: float
    stderr: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n}


def summarize(per_point: torch.Tensor) -> Estimate:
    """Mean and standard error ``sd / sqrt(n)`` of per-point values (in float64)."""
    values = per_point.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("cannot summarize an empty set of per-point values")
    sd = values.std().item() if n > 1 else 0.0
    return Estimate(values.mean().item(), sd / math.sqrt(n), n)


# -- per-point bounds from log-weights -------------------------------------------------------

def renyi_meaning(alpha: float) -> str:
    if alpha < 0:
        return "not a lower bound (alpha < 0: at least the IWAE estimate on the same draws)"
    if alpha == 0:
        return "lower bound: equals the IWAE estimate with all K draws"
    if alpha < 1:
        return "stochastic lower bound on log p(x), between the ELBO and the IWAE estimate"
    return "stochastic lower bound on log p(x), below the ELBO (alpha > 1)"


def bounds_from_log_weights(parts: LogWeights, iwae_ks: Sequence[int] = DEFAULT_IWAE_KS,
                            renyi_alphas: Sequence[float] = DEFAULT_RENYI_ALPHAS) -> dict[str, torch.Tensor]:
    """Per-point bounds from ``(K, B)`` log-weights: ``log_px``, ``elbo``,
    ``reconstruction``, ``kl``, ``gap``, ``iwae_<k>`` for ``k <= K``, ``renyi_<alpha>``."""
    log_w = parts.log_weight
    out = {
        "log_px": iwae_bound(log_w),
        "elbo": elbo_bound(log_w),
        "reconstruction": parts.reconstruction.mean(0),
        "kl": -parts.latent.mean(0),
    }
    out["gap"] = out["log_px"] - out["elbo"]
    for k in iwae_ks:
        if k <= log_w.shape[0]:
            out[f"iwae_{k}"] = grouped_iwae_bound(log_w, k)
    for alpha in renyi_alphas:
        out[f"renyi_{float(alpha):g}"] = renyi_bound(log_w, float(alpha))
    return out


# -- the whole test set ---------------------------------------------------------------------------

@dataclass
class EvaluationOptions:
    """What :func:`evaluate_test_set` computes and how it bounds memory."""

    num_particles: int = DEFAULT_PARTICLES
    iwae_ks: tuple[int, ...] = DEFAULT_IWAE_KS
    renyi_alphas: tuple[float, ...] = DEFAULT_RENYI_ALPHAS
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB
    khat: bool = True
    progress: bool = False
    #: The base seed of every trace's draws (see the module docstring); None: one drawn from torch's
    #: generator (rank 0's in a distributed evaluation).
    seed: int | None = None

    def validate(self) -> None:
        if not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {self.num_particles!r}")
        bad = [k for k in self.iwae_ks if not isinstance(k, int) or k < 1]
        if bad:
            raise ValueError(f"IWAE particle counts must be positive integers, got {bad}")
        if any(a == 1 for a in self.renyi_alphas):
            raise ValueError("Renyi alpha=1 is the ELBO (already reported); choose alphas other than 1")
        if not self.max_memory_mb > 0:
            raise ValueError(f"max_memory_mb must be positive, got {self.max_memory_mb!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")


@dataclass
class EvaluationResult:
    """Per-point results over a test set and their summary (:meth:`summary`)."""

    options: EvaluationOptions
    per_point: dict[str, torch.Tensor]
    analytic_kl_note: str | None
    sites: dict[str, diagnostics.LatentDiagnostics]
    site_guide_means: dict[str, torch.Tensor]
    khat: np.ndarray | None
    khat_note: str | None
    plan: ChunkPlan
    seconds: float

    @property
    def latent(self) -> diagnostics.LatentDiagnostics:
        """Diagnostics of the first latent site the guide samples."""
        return next(iter(self.sites.values()))

    @property
    def guide_means(self) -> torch.Tensor:
        """``(N, r)`` guide means of the first latent site."""
        return next(iter(self.site_guide_means.values()))

    @property
    def num_points(self) -> int:
        return int(self.per_point["log_px"].numel())

    def estimate(self, name: str) -> Estimate:
        return summarize(self.per_point[name])

    def summary(self) -> dict[str, Any]:
        """Every figure as JSON-ready values (means with standard errors, in nats)."""
        K = self.options.num_particles
        est = {name: self.estimate(name).as_dict() for name in self.per_point}
        na = self.analytic_kl_note
        iwae = {str(k): est[f"iwae_{k}"] for k in self.options.iwae_ks if f"iwae_{k}" in est}
        renyi = {f"{float(a):g}": {**est[f"renyi_{float(a):g}"], "meaning": renyi_meaning(float(a))}
                 for a in self.options.renyi_alphas}
        return {
            "num_points": self.num_points,
            "num_particles": K,
            "log_likelihood": {**est["log_px"], "estimator": f"importance sampling (IWAE) with K={K}"},
            "elbo": {**est["elbo"], "estimator": f"Monte Carlo, mean over the same K={K} draws"},
            "reconstruction": est["reconstruction"],
            "kl": {**est["kl"], "estimator": "Monte Carlo"},
            "elbo_analytic_kl": na or est["elbo_analytic"],
            "kl_analytic": na or est["kl_analytic"],
            "gap": {**est["gap"], "meaning": "log p(x) - ELBO = KL(q(z|x) || p(z|x)), the KL identity"},
            "iwae": iwae,
            "renyi": renyi,
            "shared_draws": (f"all bounds use the same K={K} draws per point; IWAE-k averages the "
                             f"floor(K/k) disjoint groups of k draws"),
            "latent": self.latent.as_dict(),
            "latent_sites": {name: d.as_dict() for name, d in self.sites.items()},
            "active_units_total": sum(d.active_units for d in self.sites.values()),
            "kl_per_site": {name[len("kl_site_"):]: est[name] for name in est if name.startswith("kl_site_")}
            if len(self.sites) > 1 else None,
            "psis": diagnostics.khat_summary(self.khat) if self.khat is not None else self.khat_note,
            "chunking": self.plan.as_dict(),
            "seconds": self.seconds,
        }


@torch.no_grad()
def evaluate_test_set(program: Any, x: torch.Tensor, y: torch.Tensor | None = None,
                      options: EvaluationOptions | None = None, world: World | None = None) -> EvaluationResult:
    """Bounds, latent diagnostics and k-hat over ``x`` with one pass of ``K`` draws per point.

    ``program`` is any model/guide pair (:func:`~pyro_vae.train.program.as_program`);
    ``y`` is passed to it as a second argument when given (conditional programs).

    Memory stays bounded by ``options.max_memory_mb`` (see
    :func:`pyro_vae.evaluation.importance.plan_chunks`); per-point results are kept
    (``N`` floats per figure) for standard errors, and k-hat is computed group
    by group, so the full ``(K, N)`` weight matrix never exists.

    With a distributed ``world`` (:mod:`pyro_vae.train.distributed`) every rank
    passes the whole ``x``, evaluates its share of the blocks of the plan, and
    gets the result over all of ``x``.
    """
    options = options or EvaluationOptions()
    options.validate()
    world = world or World()
    seed = options.seed
    if seed is None:
        seed = world.broadcast_object(int(torch.randint(2**62, ())))
    K = options.num_particles
    want_khat = options.khat and K >= diagnostics.MIN_KHAT_PARTICLES
    khat_note = None if want_khat else (
        "n/a (disabled)" if not options.khat else
        f"n/a (PSIS k-hat needs at least {diagnostics.MIN_KHAT_PARTICLES} particles; K={K})")
    program = as_program(program)
    probe = batch_args(x[:2], None if y is None else y[:2])
    device = program_device(program, *probe)
    plan = plan_chunks(program, x.shape[0], K, x.shape[-1], options.max_memory_mb, x.dtype,
                       tuple(a.to(device) for a in probe), device)
    lo, hi = 0, x.shape[0]
    if world.distributed:
        plan = world.broadcast_object(plan)  # every rank cuts the work as rank 0 does
        blocks = math.ceil(x.shape[0] / plan.block)
        first, stop = shard_bounds(blocks, world.rank, world.size)
        lo, hi = first * plan.block, min(stop * plan.block, x.shape[0])
    collected: dict[str, list[torch.Tensor]] = {}
    khats: list[np.ndarray] = []
    latent = diagnostics.SiteAccumulators()
    analytic_note = None
    start = time.perf_counter()
    groups = iter_point_groups(program, x[lo:hi], None if y is None else y[lo:hi], K, plan,
                               progress=options.progress and world.is_main, desc=f"evaluating (K={K})", seed=seed,
                               offset=lo) if hi > lo else ()
    for points, xg, yg, group_parts in groups:
        # Block by block, on contiguous copies: a point's numbers do not depend on the width of the
        # group it came in (vectorized reductions round by width).
        cuts = [*range(0, xg.shape[0], plan.block), xg.shape[0]]
        for b0, b1 in zip(cuts, cuts[1:]):
            parts = _columns(group_parts, b0, b1)
            stats = bounds_from_log_weights(parts, options.iwae_ks, options.renyi_alphas)
            if len(parts.sites) > 1:
                for name, value in parts.sites.items():
                    stats[f"kl_site_{name}"] = -value.mean(0)
            # The guide's draws of the diagnostics: seeded by the block's first point.
            torch.manual_seed(mix_seed(seed, lo + points.start + b0, LATENT_STREAM))
            sites = diagnostics.latent_sites(program, xg[b0:b1], None if yg is None else yg[b0:b1])
            kl, note = diagnostics.analytic_kl(sites)
            analytic_note = analytic_note or note
            if kl is not None:
                stats["kl_analytic"] = kl
                stats["elbo_analytic"] = stats["reconstruction"] - kl
            for name, value in stats.items():
                collected.setdefault(name, []).append(value.detach().cpu())
            latent.add(sites)
            if want_khat:
                khats.append(arviz_compat.psis_khat(parts.log_weight.T))
    if world.distributed:  # every rank's share, in the order of the points
        shares = world.all_gather_objects((collected, khats, latent, analytic_note))
        collected, khats = {}, []
        for share_collected, share_khats, _, share_note in shares:
            for name, values in share_collected.items():
                collected.setdefault(name, []).extend(values)
            khats.extend(share_khats)
            analytic_note = analytic_note or share_note
        latent = _merge_latent([share[2] for share in shares])
    per_point = {name: torch.cat(v) for name, v in collected.items()
                 if not (analytic_note and name in ("kl_analytic", "elbo_analytic"))}
    return EvaluationResult(
        options=options, per_point=per_point, analytic_kl_note=analytic_note, sites=latent.results(),
        site_guide_means=latent.guide_means(), khat=np.concatenate(khats) if khats else None, khat_note=khat_note,
        plan=plan, seconds=time.perf_counter() - start,
    )


def _columns(parts: LogWeights, start: int, stop: int) -> LogWeights:
    """Points ``start:stop`` of ``(K, G)`` log-weights, as contiguous ``(K, stop - start)`` copies."""
    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:, start:stop].contiguous()
    return LogWeights(cut(parts.log_weight), cut(parts.reconstruction), cut(parts.latent),
                      {name: cut(value) for name, value in parts.sites.items()})


def _merge_latent(shares: list[diagnostics.SiteAccumulators]) -> diagnostics.SiteAccumulators:
    """One accumulator of the latent diagnostics from the ranks' accumulators, in rank order."""
    merged = diagnostics.SiteAccumulators(shares[0].threshold)
    for share in shares:
        for name, site in share.sites.items():
            into = merged.sites.setdefault(name, diagnostics.LatentAccumulator(name, site.threshold))
            into.means.extend(site.means)
            into.count += site.count
            into.mean_method = into.mean_method or site.mean_method
            into.event_shape = into.event_shape or site.event_shape
            into.kl_note = into.kl_note or site.kl_note
            if site.kl_sum is not None:
                into.kl_sum = site.kl_sum if into.kl_sum is None else into.kl_sum + site.kl_sum
    return merged


def per_point_bounds(program: Any, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1,
                     max_memory_mb: float = DEFAULT_MAX_MEMORY_MB) -> dict[str, torch.Tensor]:
    """Per-point ELBO (averaged over ``num_particles`` draws), its reconstruction
    and KL parts, and the IWAE bound with ``K = num_particles`` (key ``iwae``)."""
    options = EvaluationOptions(num_particles=num_particles, iwae_ks=(), renyi_alphas=(),
                                max_memory_mb=max_memory_mb, khat=False)
    result = evaluate_test_set(program, x, y, options).per_point
    return {"elbo": result["elbo"], "reconstruction": result["reconstruction"], "kl": result["kl"],
            "iwae": result["log_px"]}

