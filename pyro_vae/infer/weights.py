"""Per-point importance log-weights of any model/guide pair, in one place.

With ``z_k ~ q(z | x)``, ``k = 1..K``, the log-weight of data point ``x_n`` is

    log w_nk = log p(x_n, z_nk) - log q(z_nk | x_n)
             = sum_obs log p(x_n | ...) + sum_s [log p(z_s,nk | ...) - log q(z_s,nk | ...)]

(Burda et al. 2016, Eq. 8; docs/derivations.md, importance weights).  The
guide runs under a vectorized particle plate to the left of all the program's
plates -- the plate Pyro's estimators add for ``vectorize_particles`` -- and
the model is replayed on its draws; every site's log-density is then summed
over its event dimensions and every plate except the data plate, so each
weight is one ``(K, B)`` tensor.  The bounds of :mod:`pyro_vae.infer.bounds`
reduce it over ``K``.

Any program works: plain functions, ``PyroModule``\\ s or bound methods, any
number of latent sites with any names, extra plates inside the data plate.
The weights are those of the programs as they run: the true model, unless the
caller put a :func:`~pyro_vae.infer.scale.latent_scale` (or another handler)
around the call.  Gradients flow; evaluate under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_vae.infer.rng import preserved_rng

#: The name Pyro's estimators give their vectorized particle plate.
PARTICLE_PLATE = "num_particles_vectorized"
DATA_PLATE = "data"


class LogWeights(NamedTuple):
    """Per-particle, per-point log-weights and their parts, each ``(K, B)``."""

    log_weight: torch.Tensor       # log p(x, z_k) - log q(z_k | x)
    reconstruction: torch.Tensor   # sum of the observed sites' log-densities
    latent: torch.Tensor           # sum over latent sites of log p - log q
    sites: dict[str, torch.Tensor]  # latent site name -> log p(z_s | ...) - log q(z_s | ...)


def is_random_site(site: dict) -> bool:
    """A sample site with a distribution of its own (not a plate's subsample site)."""
    return site["type"] == "sample" and not site_is_subsample(site)


def plate_nesting(model: Callable, guide: Callable, *args, **kwargs) -> int:
    """How many plate dimensions the guide and the replayed model use (0 for none).

    Runs both once without particles and without gradients, as Pyro's estimators
    guess ``max_plate_nesting``, and puts the random state back, so the draws
    that follow are those a caller would get without this call.
    """
    with poutine.block(), torch.no_grad(), preserved_rng():
        guide_trace, model_trace = traces(model, guide, args, kwargs)
    dims = [-frame.dim for trace in (guide_trace, model_trace) for site in trace.nodes.values()
            if site["type"] == "sample" for frame in site["cond_indep_stack"]
            if frame.vectorized and frame.dim is not None]
    return max(dims, default=0)


def traces(model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int | None = None,
           particle_dim: int | None = None) -> tuple[Trace, Trace]:
    """The guide's trace and the model's replayed on it, with ``num_particles`` vectorized
    particles on the plate at ``particle_dim`` (none when ``num_particles`` is ``None``)."""
    particles = contextlib.nullcontext() if num_particles is None else \
        pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim)
    with particles:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def trace_pair(model: Callable, guide: Callable, *args, num_particles: int | None = None,
               **kwargs) -> tuple[Trace, Trace]:
    """``(guide_trace, model_trace)``: the guide traced under a vectorized particle plate left
    of all the program's plates (none when ``num_particles`` is ``None``), the model replayed
    on its draws.  Log-densities are not computed yet."""
    if num_particles is None:
        return traces(model, guide, args, kwargs)
    _check_particles(num_particles)
    nesting = _known_nesting(model, guide)
    if nesting is None:
        nesting = plate_nesting(model, guide, *args, **kwargs)
    return traces(model, guide, args, kwargs, num_particles, -(nesting + 1))


def site_log_densities(trace: Trace) -> dict[str, torch.Tensor]:
    """Each random site's scaled and masked log-density (summed over its event dims), by name."""
    trace.compute_log_prob(lambda name, site: is_random_site(site))
    return {name: site["log_prob"] for name, site in trace.nodes.items() if is_random_site(site)}


def per_point(log_density: torch.Tensor, keep: tuple[int, ...], ndim: int) -> torch.Tensor:
    """Sum ``log_density`` (broadcastable to ``ndim`` dims) over every dim but those in ``keep``
    (negative), keeping their sizes (1 where the site does not span them)."""
    missing = ndim - log_density.dim()
    if missing > 0:
        log_density = log_density.reshape((1,) * missing + log_density.shape)
    summed = [d for d in range(-log_density.dim(), 0) if d not in keep]
    if summed:
        log_density = log_density.sum(summed, keepdim=True)
    return log_density.reshape([log_density.shape[d] for d in keep])


def weights_from_traces(guide_trace: Trace, model_trace: Trace, keep: tuple[int, ...],
                        ndim: int, data_plate: str | None = None) -> LogWeights:
    """:class:`LogWeights` of the two traces, each summed down to the dims in ``keep``.

    ``data_plate``, when given, must hold every site (else a site's density is not
    per data point).  Terms are added model sites first, in program order, then
    the guide's subtracted, as Pyro's estimators add them.
    """
    model_lp = site_log_densities(model_trace)
    guide_lp = site_log_densities(guide_trace)
    recon = latent = None
    sites: dict[str, torch.Tensor] = {}
    for name, lp in model_lp.items():
        site = model_trace.nodes[name]
        _check_site(site, data_plate)
        lp = per_point(lp, keep, ndim)
        if site["is_observed"]:
            recon = lp if recon is None else recon + lp
            continue
        if name not in guide_lp:
            raise ValueError(f"latent site {name!r} of the model is not in the guide: it has no importance weight")
        latent = lp if latent is None else latent + lp
        sites[name] = lp
    for name, lp in guide_lp.items():
        site = guide_trace.nodes[name]
        if site["is_observed"]:
            continue
        _check_site(site, data_plate)
        lp = per_point(lp, keep, ndim)
        latent = -lp if latent is None else latent - lp
        sites[name] = sites[name] - lp if name in sites else -lp
    if recon is None or latent is None:
        raise ValueError("importance weights need an observed site and at least one latent site")
    shape = torch.broadcast_shapes(recon.shape, latent.shape)
    recon, latent = recon.expand(shape), latent.expand(shape)
    return LogWeights(recon + latent, recon, latent, {name: s.expand(shape) for name, s in sites.items()})


def log_weights(model: Callable, guide: Callable, *args, num_particles: int = 1, data_plate: str = DATA_PLATE,
                **kwargs) -> LogWeights:
    """``(K, B)`` log-weights ``log p(x_n, z_nk) - log q(z_nk | x_n)``, ``z_nk ~ q(z | x_n)``,
    and their parts, one per particle and data point.

    The dim of the plate named ``data_plate`` is kept; event dims and every other
    plate are summed.  A built-in :class:`~pyro_vae.models.vae.VAE`'s own
    ``model``/``guide`` with object-free parts take the direct path of
    :func:`~pyro_vae.infer.fast.direct_log_weights`: the same draws and floats,
    without the traces.
    """
    _check_particles(num_particles)
    direct = _direct_log_weights(model, guide, args, kwargs, num_particles, data_plate)
    if direct is not None:
        return direct
    guide_trace, model_trace = trace_pair(model, guide, *args, num_particles=num_particles, **kwargs)
    return weights_of_traces(guide_trace, model_trace, data_plate)


def weights_of_traces(guide_trace: Trace, model_trace: Trace, data_plate: str = DATA_PLATE) -> LogWeights:
    """``(K, B)`` :class:`LogWeights` of a :func:`trace_pair` taken with particles (for callers that
    also need the traces' draws, e.g. to export them)."""
    data_dim = _plate_dim(model_trace, data_plate)
    ndim = _particle_frame_dim(model_trace)
    return weights_from_traces(guide_trace, model_trace, (-ndim, data_dim), ndim, data_plate)


# -- helpers -------------------------------------------------------------------------------------

def _check_particles(num_particles: int) -> None:
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")


def _check_site(site: dict, data_plate: str | None) -> None:
    if data_plate is not None and not any(f.name == data_plate for f in site["cond_indep_stack"]):
        raise ValueError(f"site {site['name']!r} is outside the plate {data_plate!r}: "
                         "its log-density is not per data point")


def _plate_dim(trace: Trace, name: str) -> int:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == name and frame.dim is not None:
                return frame.dim
    raise ValueError(f"no plate named {name!r} in the model (pass data_plate=... to name the data plate)")


def _particle_frame_dim(trace: Trace) -> int:
    """The number of dims up to and including the particle plate's."""
    return -_plate_dim(trace, PARTICLE_PLATE)


def _bound_vae(model: Callable, guide: Callable):
    """The built-in VAE whose own ``model`` and ``guide`` these are, else ``None``."""
    from pyro_vae.models.vae import VAE

    vae = getattr(model, "__self__", None)
    if not isinstance(vae, VAE) or getattr(guide, "__self__", None) is not vae:
        return None
    if getattr(model, "__func__", None) is not VAE.model or getattr(guide, "__func__", None) is not VAE.guide:
        return None
    return vae


def _known_nesting(model: Callable, guide: Callable) -> int | None:
    """1 for a built-in VAE's own programs (one data plate), else unknown."""
    return 1 if _bound_vae(model, guide) is not None else None


def _direct_log_weights(model, guide, args, kwargs, num_particles, data_plate) -> LogWeights | None:
    from pyro_vae.infer.fast import direct_log_weights

    vae = _bound_vae(model, guide)
    if vae is None or kwargs or data_plate != DATA_PLATE or _PYRO_STACK or not 1 <= len(args) <= 2:
        return None
    parts = direct_log_weights(vae, *args, num_particles=num_particles)
    if parts is None:
        return None
    log_weight, recon, latent = parts
    return LogWeights(log_weight, recon, latent, {"z": latent})
