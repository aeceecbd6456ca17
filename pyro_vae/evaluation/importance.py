"""Per-data-point importance log-weights from the Pyro model and guide, chunked.

``pyro.infer.importance.vectorized_importance_weights`` sums the data plate
away; test log-likelihoods and per-point diagnostics need one weight per data
point *and* per particle.  :func:`log_weights` runs the guide under a particle
plate, replays the model against it, and keeps each site's log-density per
data point, so it works for any prior, guide and decoder that follows the
model/guide contract of :mod:`pyro_vae.models.vae`.

The importance-sampled log-likelihood (the IWAE estimator of Sec. 1.10,
Burda et al. 2015) is ``log (1/K) sum_k p(x, z_k) / q(z_k | x)``.  With
``K = 5000`` over a 10,000-image test set, the decoder's per-pixel tensors
(``K x N x 784``) would need ~150 GB, so the work is cut into *traces* of
``points_per_trace x particles_per_trace`` (data point, particle) pairs sized
from a memory budget (:func:`plan_chunks`), and the per-point results are
reduced as they arrive: :class:`StreamingLogMeanExp` for ``log p(x)`` alone,
or a ``(K, G)`` buffer per group of ``G`` points (:func:`iter_point_groups`)
when all of a point's weights are needed (PSIS k-hat, bounds at several K).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn
from tqdm.auto import tqdm

from pyro_vae.infer.bounds import StreamingLogMeanExp
from pyro_vae.models.vae import VAE

PARTICLE_PLATE = "_particles"
DEFAULT_MAX_MEMORY_MB = 512.0
# Share of the memory budget given to one group's (K, G) arrays; the rest bounds one trace.
GROUP_SHARE = 0.25
# Bytes per (point, particle) of a group: three log-weight buffers in the model's dtype, plus
# float64 copies made for PSIS k-hat and temporaries of the per-point reductions.
GROUP_BYTES_PER_PAIR_FLOAT64 = 3
MAX_GROUP_POINTS = 1000


class LogWeights(NamedTuple):
    """Per-particle, per-point log-weights and their two parts, each ``(K, B)``."""

    log_weight: torch.Tensor      # log p(x, z_k) - log q(z_k | x)
    reconstruction: torch.Tensor  # log p(x | z_k)
    latent: torch.Tensor          # log p(z_k) - log q(z_k | x)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def trace_with_particles(vae: VAE, x: torch.Tensor, y: torch.Tensor | None,
                         num_particles: int | None) -> tuple[poutine.Trace, poutine.Trace]:
    """Guide trace under a particle plate (dim -2, left of the data plate) and the
    model replayed against it: the true model, whatever beta or warm-up the VAE
    was trained with (those scales exist only inside the trainer's step).  ``num_particles=None``: no
    particle plate, one draw per point."""
    particles = contextlib.nullcontext() if num_particles is None else \
        pyro.plate(PARTICLE_PLATE, num_particles, dim=-2)
    with particles:
        guide_trace = poutine.trace(vae.guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, y)
    return guide_trace, model_trace


def is_random_site(name: str, site: dict) -> bool:
    """A sample site with a distribution (not the plate's subsample site)."""
    return site["type"] == "sample" and not site_is_subsample(site)


def log_weights_from_traces(guide_trace: poutine.Trace, model_trace: poutine.Trace) -> LogWeights:
    """Sum each site's ``log_prob`` (already summed over its event dims) into the
    reconstruction part (observed sites) and the latent part (latent sites of the
    model minus those of the guide)."""
    model_trace.compute_log_prob(is_random_site)
    guide_trace.compute_log_prob(is_random_site)
    recon = latent = None
    for name, site in model_trace.nodes.items():
        if not is_random_site(name, site):
            continue
        if site["is_observed"]:
            recon = site["log_prob"] if recon is None else recon + site["log_prob"]
        else:
            latent = site["log_prob"] if latent is None else latent + site["log_prob"]
    for name, site in guide_trace.nodes.items():
        if is_random_site(name, site) and not site["is_observed"]:
            latent = -site["log_prob"] if latent is None else latent - site["log_prob"]
    if recon is None or latent is None:
        raise ValueError("the model needs an observed site and at least one latent site to be importance-weighted")
    return LogWeights(recon + latent, recon, latent)


def log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None,
                num_particles: int = 1) -> LogWeights:
    """Log-weights ``log p(x, z_k) - log q(z_k | x)`` with ``z_k ~ q(z | x)``, in one trace.

    Returns ``(log_w, log_likelihood, log_prior_ratio)``, each of shape
    ``(num_particles, B)``: the weight, its reconstruction part
    ``log p(x | z_k)``, and its latent part ``log p(z_k) - log q(z_k | x)``
    (minus a one-sample KL estimate), of the true model.  For many
    particles or points use :func:`iter_point_groups`, which bounds memory.
    """
    _check_particles(num_particles)
    with torch.no_grad():
        guide_trace, model_trace = trace_with_particles(vae, x, y, num_particles)
        return log_weights_from_traces(guide_trace, model_trace)


# -- chunking ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkPlan:
    """How a ``(K particles) x (N points)`` computation is cut up.

    One Pyro trace covers ``points_per_trace x particles_per_trace`` pairs; the
    per-point results are assembled in groups of ``group_points`` points (a
    ``(K, group_points)`` buffer).  ``bytes_per_pair`` is the estimate the plan
    was sized from.
    """

    num_points: int
    num_particles: int
    points_per_trace: int
    particles_per_trace: int
    group_points: int
    bytes_per_pair: int
    max_memory_mb: float

    @property
    def num_traces(self) -> int:
        groups = math.ceil(self.num_points / self.group_points)
        per_group = math.ceil(self.group_points / self.points_per_trace)
        return groups * per_group * math.ceil(self.num_particles / self.particles_per_trace)

    def as_dict(self) -> dict[str, float | int]:
        return {"points_per_trace": self.points_per_trace, "particles_per_trace": self.particles_per_trace,
                "group_points": self.group_points, "bytes_per_pair": self.bytes_per_pair,
                "max_memory_mb": self.max_memory_mb}


def estimate_bytes_per_pair(vae: VAE, input_dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak bytes of intermediate tensors per (data point, particle) pair.

    A trace keeps, per pair: every decoder layer's output (the widths of its
    ``nn.Linear`` layers, about twice with the activation), a few copies of the
    per-pixel log-density (``input_dim``), and the latent draw and its
    densities.  This is an estimate; decoders without ``nn.Linear`` layers are
    counted as four per-pixel tensors.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    widths = sum(m.out_features for m in vae.decoder.modules() if isinstance(m, nn.Linear))
    if widths == 0:
        widths = 2 * input_dim
    return itemsize * (3 * input_dim + 2 * widths + 8 * vae.latent_dim + 8)


def plan_chunks(vae: VAE, num_points: int, num_particles: int, input_dim: int,
                max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, dtype: torch.dtype = torch.float32) -> ChunkPlan:
    """Size traces and groups so that one trace and one group fit in ``max_memory_mb``.

    Three quarters of the budget bound one trace: all ``K`` particles of a point
    go into one trace when they fit (then several points share the trace),
    otherwise a point's particles are split into near-equal chunks.  The last
    quarter bounds the ``(K, G)`` arrays of a group of ``G`` points (at most
    :data:`MAX_GROUP_POINTS`, at least one trace's points).
    """
    if num_points < 1:
        raise ValueError(f"need at least one data point to evaluate, got {num_points}")
    _check_particles(num_particles)
    if not max_memory_mb > 0:
        raise ValueError(f"max_memory_mb must be positive, got {max_memory_mb!r}")
    per_pair = estimate_bytes_per_pair(vae, input_dim, dtype)
    budget = max_memory_mb * 2**20
    pairs = max(1, int(budget * (1 - GROUP_SHARE) // per_pair))
    if pairs >= num_particles:
        particles = num_particles
        points = min(num_points, pairs // num_particles)
    else:
        splits = math.ceil(num_particles / pairs)
        particles = math.ceil(num_particles / splits)
        points = 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    group_per_pair = 3 * itemsize + 8 * GROUP_BYTES_PER_PAIR_FLOAT64
    buffer_points = int(budget * GROUP_SHARE // (group_per_pair * num_particles))
    group = min(num_points, max(points, min(MAX_GROUP_POINTS, buffer_points)))
    group = max(points, group - group % points)  # whole traces per group
    return ChunkPlan(num_points, num_particles, points, particles, group, per_pair, float(max_memory_mb))


def iter_point_groups(vae: VAE, x: torch.Tensor, y: torch.Tensor | None, num_particles: int,
                      plan: ChunkPlan | None = None, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                      progress: bool = False, desc: str = "importance sampling",
                      ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None, LogWeights]]:
    """Yield ``(points, x_group, y_group, LogWeights)`` with ``(K, G)`` weights per group of points.

    Runs on the model's device (each group is moved there), without gradients,
    one Pyro trace per ``plan.points_per_trace x plan.particles_per_trace``
    block, with a progress bar over data points when ``progress`` is set.
    """
    device = module_device(vae)
    if plan is None:
        plan = plan_chunks(vae, x.shape[0], num_particles, x.shape[-1], max_memory_mb, x.dtype)
    n = x.shape[0]
    bar = tqdm(total=n, desc=desc, unit="pt", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for start in range(0, n, plan.group_points):
            points = slice(start, min(start + plan.group_points, n))
            xg = x[points].to(device)
            yg = None if y is None else y[points].to(device)
            parts = _group_log_weights(vae, xg, yg, num_particles, plan)
            yield points, xg, yg, parts
            bar.update(points.stop - points.start)
    finally:
        bar.close()


def _group_log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None, num_particles: int,
                       plan: ChunkPlan) -> LogWeights:
    g = x.shape[0]
    if g <= plan.points_per_trace and num_particles <= plan.particles_per_trace:
        return log_weights(vae, x, y, num_particles)
    buffers = [x.new_empty((num_particles, g)) for _ in range(3)]
    for p0 in range(0, g, plan.points_per_trace):
        p1 = min(p0 + plan.points_per_trace, g)
        xb = x[p0:p1]
        yb = None if y is None else y[p0:p1]
        for k0 in range(0, num_particles, plan.particles_per_trace):
            k1 = min(k0 + plan.particles_per_trace, num_particles)
            for buffer, part in zip(buffers, log_weights(vae, xb, yb, k1 - k0)):
                buffer[k0:k1, p0:p1] = part
    return LogWeights(*buffers)


# -- reductions ---------------------------------------------------------------------------

@torch.no_grad()
def importance_log_likelihood(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None,
                              num_particles: int = 5000, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                              progress: bool = False) -> torch.Tensor:
    """Importance-sampled ``log p(x)`` per data point (the IWAE estimator, Sec. 1.10).

    ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``, streamed
    over particle chunks (:class:`StreamingLogMeanExp`) so that only one trace
    of at most ``max_memory_mb`` is alive at a time.  Returns a ``(N,)`` tensor
    on the model's device.  Its expectation is a lower bound on ``log p(x)``
    that tightens as ``K`` grows (Burda et al. 2015, Theorem 1).
    """
    device = module_device(vae)
    plan = plan_chunks(vae, x.shape[0], num_particles, x.shape[-1], max_memory_mb, x.dtype)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=device)
    bar = tqdm(total=x.shape[0], desc="log p(x)", unit="pt", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for p0 in range(0, x.shape[0], plan.points_per_trace):
            p1 = min(p0 + plan.points_per_trace, x.shape[0])
            xb = x[p0:p1].to(device)
            yb = None if y is None else y[p0:p1].to(device)
            acc = StreamingLogMeanExp()
            for k0 in range(0, num_particles, plan.particles_per_trace):
                k = min(plan.particles_per_trace, num_particles - k0)
                acc.update(log_weights(vae, xb, yb, k).log_weight)
            out[p0:p1] = acc.result()
            bar.update(p1 - p0)
    finally:
        bar.close()
    return out


@torch.no_grad()
def collect_log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1,
                        max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, progress: bool = False) -> LogWeights:
    """All ``(K, N)`` log-weights of ``x``, computed in bounded chunks (memory: ``3 K N`` floats)."""
    groups = [parts for _, _, _, parts in iter_point_groups(vae, x, y, num_particles,
                                                            max_memory_mb=max_memory_mb, progress=progress)]
    return LogWeights(*(torch.cat(tensors, dim=1) for tensors in zip(*groups)))


def _check_particles(num_particles: int) -> None:
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
