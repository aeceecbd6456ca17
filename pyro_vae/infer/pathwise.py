"""Path derivatives of the log-weights with the guide's parameters held fixed.

A reparameterized draw ``z = g_phi(eps, x)`` carries the graph of the guide's
parameters ``phi``.  The estimators that differentiate ``log w`` along the path
``z -> log w`` only (sticking the landing, DReG), or that give the model and the
guide different objectives (PIWAE), need ``d log w / dz`` with ``phi`` held
fixed, for any guide.  :func:`leaf_log_weights` gets it without touching the
guide's code: it evaluates the log-weights at a detached leaf copy ``z'`` of
every draw -- the model replayed on the leaves, and the guide's log-density
either at the leaves (``density_at="leaves"``: from the recorded distribution
when the guide has one latent site, else by re-running the guide on the leaves,
since ``q(z2 | z1)`` depends on ``z1``) or at its own draws
(``density_at="draws"``).  Then ``torch.autograd.grad(objective, leaves)`` is
``d objective / dz`` at fixed parameters, and :func:`path_term` turns it into a
zero-valued tensor ``sum_s <z_s, g_s> - value`` whose gradient is
``sum_s g_s dz_s / dphi``, the chain rule continued through the guide's own
graph (docs/derivations.md, Sticking the landing).  The objective is
``sum_k c_k log w_k`` with detached coefficients ``c_k``: ``1/K`` for STL,
``w~_k^2`` for DReG, the bound's own derivative for PIWAE's guide
(:func:`bound_derivative`).

The gradient with respect to the leaves is one extra backward pass through the
model (the decoder) and the guide's density, computing input gradients only.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pyro
import torch
from pyro.infer import ELBO

from pyro_vae.infer.estimators import plate_reduction
from pyro_vae.infer.fast import _check_readable, _Replay, _SiteRecorder
from pyro_vae.infer.weights import site_log_prob, weights_from_sites

DENSITY_AT = ("leaves", "draws")


class LeafWeights(NamedTuple):
    """Per-particle log-weights at the leaf copies of the guide's draws, ``(K, ...)``."""

    log_weight: torch.Tensor         # log p(x, z') - log q(z | x), z' the leaves
    log_q: torch.Tensor              # the guide's part, at the leaves or at the draws
    draws: tuple[torch.Tensor, ...]  # the guide's draws z, with the guide's graph
    leaves: tuple[torch.Tensor, ...]  # their detached copies z' (leaves that require grad)
    guide_sites: tuple[dict, ...]    # the guide's recorded sites, one dict per particle run

    def model_side(self) -> torch.Tensor:
        """``log w`` whose gradient flows through the model's log-density only (the guide's is held
        constant): the value of ``log w``, the gradient of ``log p(x, z')``."""
        return self.log_weight + (self.log_q - self.log_q.detach())

    def guide_side(self) -> torch.Tensor:
        """``log w`` whose gradient flows through the guide's log-density only: the value of
        ``log w``, the gradient of ``-log q``."""
        return (self.log_weight + self.log_q).detach() - self.log_q


def leaf_log_weights(elbo: ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                     density_at: str = "leaves") -> LeafWeights:
    """:class:`LeafWeights` of ``elbo.num_particles`` particles: one vectorized run, or one run per
    particle stacked, as ``elbo`` draws them; each site summed over the plates not shared by all
    sites (:func:`~pyro_vae.infer.estimators.plate_reduction`).

    Raises :class:`~pyro_vae.infer.fast.UnsupportedProgram` for a guide site without
    ``rsample``, enumeration, a subsampled plate or a model latent site the guide does not
    sample, naming the site.
    """
    if density_at not in DENSITY_AT:
        raise ValueError(f"density_at must be one of {', '.join(DENSITY_AT)}, got {density_at!r}")
    with pyro.validation_enabled(False):
        if elbo.vectorize_particles:
            if elbo.max_plate_nesting == math.inf:
                elbo._guess_max_plate_nesting(model, guide, args, kwargs)
            runs = [_leaf_run(elbo._vectorized_num_particles(model), elbo._vectorized_num_particles(guide),
                              args, kwargs, density_at)]
        else:
            runs = [_leaf_run(model, guide, args, kwargs, density_at) for _ in range(elbo.num_particles)]
    if elbo.vectorize_particles and elbo.num_particles > 1:
        log_weight, log_q = runs[0][0], runs[0][1]
    else:
        log_weight, log_q = torch.stack([run[0] for run in runs]), torch.stack([run[1] for run in runs])
    draws = tuple(z for run in runs for z in run[2])
    leaves = tuple(leaf for run in runs for leaf in run[3])
    return LeafWeights(log_weight, log_q, draws, leaves, tuple(run[4] for run in runs))


def bound_derivative(bound: Callable[[torch.Tensor], torch.Tensor], log_weight: torch.Tensor) -> torch.Tensor:
    """``d sum(bound(log w)) / d log w_k``, detached: the weight of each particle in the bound's
    gradient (``1/K`` for the ELBO, the self-normalized ``w~_k`` for IWAE, within each group and
    over ``M`` for MIWAE)."""
    with torch.enable_grad():
        log_weight = log_weight.detach().requires_grad_()
        return torch.autograd.grad(bound(log_weight).sum(), log_weight)[0]


def path_term(weights: LeafWeights, coefficients: torch.Tensor) -> torch.Tensor:
    """``sum_s <z_s, g_s> - value`` with ``g_s = d (sum_k c_k log w_k) / d z'_s`` at the leaves, ``c``
    the ``coefficients`` (detached, the shape of the log-weights): zero-valued, with gradient
    ``sum_k c_k (d log w_k / d z_k)(d z_k / d phi)`` through the guide's draws (a zero tensor when
    no draw carries a graph).  The graph of the log-weights is kept for the caller's own backward.

    Coefficients below :func:`negligible` are set to zero: their terms are far below the
    rounding of the sum, and left in, they would run the backward pass through subnormal
    numbers, which CPUs compute many times more slowly.
    """
    pairs = [(z, leaf) for z, leaf in zip(weights.draws, weights.leaves) if z.requires_grad]
    if not pairs:
        return weights.log_weight.new_zeros(())
    c = coefficients.detach()
    c = torch.where(c.abs() < negligible(c.dtype), torch.zeros_like(c), c)
    objective = (c * weights.log_weight).sum()
    grads = torch.autograd.grad(objective, [leaf for _, leaf in pairs], retain_graph=True, allow_unused=True)
    term = objective.new_zeros(())
    for (z, _), g in zip(pairs, grads):
        if g is not None:
            term = term + (z * g).sum()
    return term - term.detach()


def negligible(dtype: torch.dtype) -> float:
    """``tiny / eps`` of ``dtype`` (about 1e-31 in float32, 1e-292 in float64): a particle's weight
    below it changes a gradient by far less than rounding, since the largest weight of a point is
    at least ``1 / K^2``."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps


def _leaf_run(model: Callable, guide: Callable, args: tuple, kwargs: dict, density_at: str):
    """One run: ``(log_weight, log_q, draws, leaves, guide_sites)`` of the guide and the model
    replayed on leaf copies of its draws."""
    guide_recorder = _SiteRecorder()
    with guide_recorder:
        guide(*args, **kwargs)
    guide_sites = guide_recorder.sites
    _check_readable({}, guide_sites)  # the guide's own sites first: leaves need reparameterized draws
    leaves = {name: site["value"].detach().requires_grad_() for name, site in guide_sites.items()}
    replay = {name: {"value": leaf, "infer": guide_sites[name]["infer"]} for name, leaf in leaves.items()}
    model_recorder = _SiteRecorder()
    with model_recorder, _Replay(replay):
        model(*args, **kwargs)
    model_sites = model_recorder.sites
    _check_readable(model_sites, guide_sites)
    if density_at == "draws":
        density_sites = guide_sites
    elif len(leaves) == 1:  # q(z | x) does not depend on another latent: its recorded distribution will do
        density_sites = {name: {**site, "value": leaves[name], "log_prob": None} for name, site in guide_sites.items()}
    else:
        rerun = _SiteRecorder()
        with rerun, _Replay(replay):
            guide(*args, **kwargs)
        density_sites = rerun.sites
    reduce = plate_reduction(model_sites)
    log_weight = weights_from_sites(model_sites, density_sites, reduce, parts=False).log_weight
    log_q = None
    for site in density_sites.values():
        lp = reduce(site_log_prob(site))
        log_q = lp if log_q is None else log_q + lp
    names = list(leaves)
    return (log_weight, log_q, tuple(guide_sites[n]["value"] for n in names), tuple(leaves[n] for n in names),
            guide_sites)


__all__ = ["DENSITY_AT", "LeafWeights", "bound_derivative", "leaf_log_weights", "negligible", "path_term"]
