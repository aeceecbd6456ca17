"""Per-point importance log-weights of any model/guide pair, in one place.

With ``z_k ~ q(z | x)``, ``k = 1..K``, the log-weight of data point ``x_n`` is

    log w_nk = log p(x_n, z_nk) - log q(z_nk | x_n)
             = sum_obs log p(x_n | ...) + sum_s [log p(z_s,nk | ...) - log q(z_s,nk | ...)]

(Burda et al. 2016, Eq. 8; docs/derivations.md, Importance weights).  The
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
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from pyro_vae.infer.direct import (
    bound_vae,
    direct_latent_scale,
    direct_log_weights,
)
from pyro_vae.infer.rng import preserved_rng
from pyro_vae.models.vae import LATENT_SITE

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


def site_log_prob(site: dict) -> torch.Tensor:
    """A site's log-density, summed over its event dims, scaled and masked as the site says;
    computed once and kept on the site (``site["log_prob"]``), as ``Trace.compute_log_prob`` does."""
    log_prob = site.get("log_prob")
    if log_prob is None:
        log_prob = scale_and_mask(site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"]),
                                  site["scale"], site["mask"])
        site["log_prob"] = log_prob
    return log_prob


def random_sites(sites: dict) -> dict[str, dict]:
    """The random sites (:func:`is_random_site`) of a trace's nodes or another ``name -> site`` map."""
    return {name: site for name, site in sites.items() if is_random_site(site)}


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


def weights_from_sites(model_sites: dict[str, dict], guide_sites: dict[str, dict],
                       reduce: Callable[[torch.Tensor], torch.Tensor], parts: bool = True) -> LogWeights:
    """:class:`LogWeights` from the random sites of the guide and of the model replayed on it,
    each site's log-density first reduced by ``reduce`` (e.g. to ``(K, B)``).

    ``log_weight`` adds the model's sites in program order and subtracts the
    guide's, the order Pyro's estimators add them in, so it is their
    per-particle weight to the bit.  With ``parts=False`` only ``log_weight`` is
    computed (``reconstruction`` and ``latent`` are ``None``, ``sites`` empty):
    what a training step needs.
    """
    total = recon = None
    sites: dict[str, torch.Tensor] = {}
    for name, site in model_sites.items():
        lp = reduce(site_log_prob(site))
        total = lp if total is None else total + lp
        if site["is_observed"]:
            if parts:
                recon = lp if recon is None else recon + lp
            continue
        if name not in guide_sites:
            raise ValueError(f"latent site {name!r} of the model is not in the guide: it has no importance weight")
        if parts:
            sites[name] = lp
    has_latent = False
    for name, site in guide_sites.items():
        if site["is_observed"]:
            continue
        has_latent = True
        lp = reduce(site_log_prob(site))
        total = -lp if total is None else total - lp
        if parts:
            sites[name] = sites[name] - lp if name in sites else -lp
    observed = any(site["is_observed"] for site in model_sites.values())
    if total is None or not has_latent or not observed:
        raise ValueError("importance weights need an observed site and at least one latent site")
    if not parts:
        return LogWeights(total, None, None, {})
    latent = None
    for value in sites.values():
        latent = value if latent is None else latent + value
    shape = total.shape
    return LogWeights(total, recon.expand(shape), latent.expand(shape),
                      {name: value.expand(shape) for name, value in sites.items()})


def weights_of_traces(guide_trace: Trace, model_trace: Trace, data_plate: str = DATA_PLATE) -> LogWeights:
    """``(K, B)`` :class:`LogWeights` of a :func:`trace_pair` taken with particles (for callers that
    also need the traces' draws, e.g. to export them)."""
    model_sites, guide_sites = random_sites(model_trace.nodes), random_sites(guide_trace.nodes)
    for site in (*model_sites.values(), *guide_sites.values()):
        if not any(frame.name == data_plate for frame in site["cond_indep_stack"]):
            raise ValueError(f"site {site['name']!r} is outside the plate {data_plate!r}: "
                             "its log-density is not per data point")
    ndim = -_plate_dim(model_trace, PARTICLE_PLATE)
    keep = (-ndim, _plate_dim(model_trace, data_plate))
    return weights_from_sites(model_sites, guide_sites, lambda lp: per_point(lp, keep, ndim))


def log_weights(model: Callable, guide: Callable, *args, num_particles: int = 1, data_plate: str = DATA_PLATE,
                **kwargs) -> LogWeights:
    """``(K, B)`` log-weights ``log p(x_n, z_nk) - log q(z_nk | x_n)``, ``z_nk ~ q(z | x_n)``,
    and their parts, one per particle and data point.

    The dim of the plate named ``data_plate`` is kept; event dims and every other
    plate are summed.  A built-in :class:`~pyro_vae.models.vae.VAE`'s own
    ``model``/``guide`` with object-free parts take the direct path of
    :func:`~pyro_vae.infer.direct.direct_log_weights`: the same draws and floats,
    without the traces.
    """
    _check_particles(num_particles)
    direct = _direct_log_weights(model, guide, args, kwargs, num_particles, data_plate)
    if direct is not None:
        return direct
    guide_trace, model_trace = trace_pair(model, guide, *args, num_particles=num_particles, **kwargs)
    return weights_of_traces(guide_trace, model_trace, data_plate)


# -- helpers -------------------------------------------------------------------------------------

def _check_particles(num_particles: int) -> None:
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")


def _plate_dim(trace: Trace, name: str) -> int:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == name and frame.dim is not None:
                return frame.dim
    raise ValueError(f"no plate named {name!r} in the model (pass data_plate=... to name the data plate)")


def _known_nesting(model: Callable, guide: Callable) -> int | None:
    """1 for a built-in VAE's own programs (one data plate), else unknown."""
    return 1 if bound_vae(model, guide) is not None else None


def _direct_log_weights(model, guide, args, kwargs, num_particles, data_plate) -> LogWeights | None:
    vae, scale = bound_vae(model, guide), direct_latent_scale()
    if vae is None or scale is None or kwargs or data_plate != DATA_PLATE or not 1 <= len(args) <= 2:
        return None
    parts = direct_log_weights(vae, *args, num_particles=num_particles, scale=scale)
    if parts is None:
        return None
    log_weight, recon, latent = parts
    return LogWeights(log_weight, recon, latent, {LATENT_SITE: latent})
