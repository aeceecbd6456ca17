"""Objectives chosen by name, and what ``TraceMeanField_ELBO`` computes analytically.

=========  ==========================================================  ==============
name       Pyro estimator                                              default particles
=========  ==========================================================  ==============
trace      ``Trace_ELBO``: Monte Carlo ELBO, Eq. (2)/(8)               1
meanfield  ``TraceMeanField_ELBO``: analytic KL where registered, Eq. (6)  1
renyi      ``RenyiELBO(alpha)``: Renyi bound (Li & Turner 2016)        5
iwae       ``RenyiELBO(alpha=0)``: importance-weighted bound (Sec. 1.10)  5
=========  ==========================================================  ==============

Several particles are always vectorized (one pass with a particle plate on the
left of the data plate).  Every loss is the *sum* over the data plate, the way
Pyro defines it; callers divide by the batch size for nats per data point.
"""

from __future__ import annotations

import warnings

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan

from pyro_vae.infer.bounds import renyi_bound

OBJECTIVES = ("trace", "meanfield", "renyi", "iwae")
DEFAULT_PARTICLES = {"trace": 1, "meanfield": 1, "renyi": 5, "iwae": 5}
MAX_PLATE_NESTING = 1  # the data plate


class DifferentiableRenyiELBO(RenyiELBO):
    """``RenyiELBO`` with a ``differentiable_loss``, so one ``torch.optim``
    optimizer can drive it like ``Trace_ELBO``.

    The loss value is Pyro's, term for term:
    ``-1/(1-alpha) sum_n log (1/K) sum_k w_nk^(1-alpha)`` with
    ``log w = log p(x, z) - log q(z | x)`` per data point.  For reparameterized
    guide sites its gradient equals ``RenyiELBO.loss_and_grads``' surrogate
    (self-normalized weights times the particle ELBOs); score-function sites are
    refused, as Pyro refuses them for ``alpha != 0`` mixtures of both.
    Unlike ``loss_and_grads`` it never calls ``.item()``, so a GPU step has no
    host sync.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            elbo_particle = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    elbo_particle = elbo_particle + torch_sum(site["log_prob"], sum_dims)
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    if not is_identically_zero(site["score_parts"].score_function):
                        raise NotImplementedError(
                            f"site {site['name']!r} is not reparameterized; "
                            "DifferentiableRenyiELBO needs reparameterized guide sites"
                        )
                    elbo_particle = elbo_particle - torch_sum(site["log_prob"], sum_dims)
            particles.append(elbo_particle)
        if self.vectorize_particles and self.num_particles > 1:
            elbo_particles = particles[0]
        else:
            elbo_particles = torch.stack(particles)
        loss = -renyi_bound(elbo_particles, self.alpha).sum()
        warn_if_nan(loss, "loss")
        return loss


def make_elbo(name: str, num_particles: int | None = None, alpha: float | None = None) -> ELBO:
    """Build the Pyro estimator called ``name`` (one of :data:`OBJECTIVES`).

    ``num_particles`` defaults per objective (:data:`DEFAULT_PARTICLES`);
    ``alpha`` is required by ``renyi`` (any value but 1) and fixed to 0 by
    ``iwae``.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    k = DEFAULT_PARTICLES[name] if num_particles is None else int(num_particles)
    if k < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    common = dict(num_particles=k, max_plate_nesting=MAX_PLATE_NESTING, vectorize_particles=k > 1)
    if name == "trace":
        return Trace_ELBO(**common)
    if name == "meanfield":
        return TraceMeanField_ELBO(**common)
    if name == "iwae":
        if alpha not in (None, 0, 0.0):
            raise ValueError(f"iwae is RenyiELBO with alpha=0; got alpha={alpha!r} (use --objective renyi)")
        return DifferentiableRenyiELBO(alpha=0.0, **common)
    if alpha is None:
        raise ValueError("objective 'renyi' needs alpha (any real number except 1), e.g. --alpha 0.5")
    if alpha == 1:
        raise ValueError("renyi with alpha=1 is the ELBO; use --objective trace (alpha must differ from 1)")
    return DifferentiableRenyiELBO(alpha=float(alpha), **common)


def analytic_kl_sites(model, guide, *args, **kwargs) -> dict[str, bool]:
    """For each latent site, whether ``TraceMeanField_ELBO`` can use an analytic KL.

    ``TraceMeanField_ELBO`` calls ``kl_divergence(q, p)`` per site and silently
    falls back to a Monte Carlo estimate where no KL is registered for the
    pair; this runs the guide once, replays the model, and reports which
    sites get the closed form (``True``) and which the fallback (``False``).
    """
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    report = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        try:
            with torch.no_grad():
                kl_divergence(site["fn"], model_trace.nodes[name]["fn"])
            report[name] = True
        except NotImplementedError:
            report[name] = False
    return report


def warn_about_monte_carlo_kl(report: dict[str, bool]) -> None:
    """Warn, naming the sites, when ``meanfield`` would fall back to Monte Carlo."""
    fallback = [name for name, analytic in report.items() if not analytic]
    if fallback:
        warnings.warn(
            "TraceMeanField_ELBO has no analytic KL registered for site(s) "
            f"{', '.join(fallback)}: it falls back to a Monte Carlo estimate there",
            stacklevel=2,
        )
