"""Objectives chosen by name, and what ``TraceMeanField_ELBO`` computes analytically.

Each name, its estimator (equations of docs/derivations.md) and its default particles ``K``:

* ``trace``: ``Trace_ELBO``, the Monte Carlo ELBO (D15); 1.
* ``meanfield``: ``TraceMeanField_ELBO``, the analytic KL where one is registered (D16); 1.
* ``renyi``: ``RenyiELBO(alpha)``, the Renyi bound (Li & Turner 2016; D41); 5.
* ``iwae``: ``RenyiELBO(alpha=0)``, the importance-weighted bound (Burda et al. 2016; D36); 5.
* ``iwae-dreg``: :class:`~pyro_vae.infer.dreg.DReG_IWAE_ELBO`, the IWAE bound with the doubly
  reparameterized guide gradient (Tucker et al. 2018; D47); 5.
* ``stl``: :class:`~pyro_vae.infer.stl.STL_ELBO`, the ELBO with the sticking-the-landing guide
  gradient (Roeder et al. 2017; D45); 1.
* ``miwae``: :class:`~pyro_vae.infer.tighter.MIWAE_ELBO`, the mean of ``M`` IWAE bounds of ``L``
  draws (Rainforth et al. 2018; D48); 5 per group, 2 groups.
* ``ciwae``: :class:`~pyro_vae.infer.tighter.CIWAE_ELBO`, ``beta`` ELBO + (1 - ``beta``) IWAE on the
  same draws (Rainforth et al. 2018; D49); 5.
* ``piwae``: :class:`~pyro_vae.infer.tighter.PIWAE_ELBO`, the model steps on IWAE, the guide on
  MIWAE, from the same draws (Rainforth et al. 2018; D50); 5 per group, 2 groups.

Several particles are always vectorized (one pass with a particle plate on the
left of the data plate).  Every loss is the *sum* over the data plate, the way
Pyro defines it; callers divide by the batch size for nats per data point.
For ``miwae`` and ``piwae`` the particles are the ``L`` draws of each of the
``M`` groups, ``M L`` draws per point in all (:func:`draws_per_point`).
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

from pyro_vae.infer import kl  # noqa: F401  (registers KL(correlated Gaussian || diagonal Gaussian) for meanfield)
from pyro_vae.infer.bounds import renyi_bound

OBJECTIVES = ("trace", "meanfield", "renyi", "iwae", "iwae-dreg", "stl", "miwae", "ciwae", "piwae")
#: Particles per point by objective; for ``miwae``/``piwae`` the draws ``L`` per group.
DEFAULT_PARTICLES = {"trace": 1, "meanfield": 1, "renyi": 5, "iwae": 5, "iwae-dreg": 5, "stl": 1, "miwae": 5,
                     "ciwae": 5, "piwae": 5}
#: The objectives that split each point's draws into ``M`` groups of ``L``.
GROUPED_OBJECTIVES = ("miwae", "piwae")
#: Groups ``M`` of ``miwae``/``piwae`` when not given.
DEFAULT_GROUPS = 2
#: Weight of the ELBO in ``ciwae`` when not given.
DEFAULT_CIWAE_BETA = 0.5
MAX_PLATE_NESTING = 1  # the data plate


def pyro_log_weights(elbo: ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """Per-particle log-weights ``(K, ...)`` read from Pyro's own traces, as ``RenyiELBO`` reads them.

    ``log w_k = sum_model log p - sum_guide log q`` per particle, each site's
    log-density summed over the plates not shared by all sites, from the traces
    of ``elbo._get_traces`` (one vectorized trace pair, or ``num_particles``
    pairs stacked); ``K`` is the first dimension.  A guide site with a
    score-function part (not reparameterized) is refused.
    """
    particles = []
    for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
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
                        f"{type(elbo).__name__} needs reparameterized guide sites"
                    )
                elbo_particle = elbo_particle - torch_sum(site["log_prob"], sum_dims)
        particles.append(elbo_particle)
    if elbo.vectorize_particles and elbo.num_particles > 1:
        return particles[0]
    return torch.stack(particles)


class DifferentiableRenyiELBO(RenyiELBO):
    """``RenyiELBO`` with a ``differentiable_loss``, so one ``torch.optim``
    optimizer can drive it like ``Trace_ELBO``.

    The loss value is Pyro's, term for term:
    ``-1/(1-alpha) sum_n log (1/K) sum_k w_nk^(1-alpha)`` with
    ``log w = log p(x, z) - log q(z | x)`` per data point (:func:`pyro_log_weights`).
    For reparameterized guide sites its gradient equals ``RenyiELBO.loss_and_grads``'
    surrogate (self-normalized weights times the particle ELBOs); score-function
    sites are refused, as Pyro refuses them for ``alpha != 0`` mixtures of both.
    Unlike ``loss_and_grads`` it never calls ``.item()``, so a GPU step has no
    host sync.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = -renyi_bound(pyro_log_weights(self, model, guide, *args, **kwargs), self.alpha).sum()
        warn_if_nan(loss, "loss")
        return loss


def draws_per_point(objective: str, particles: int | None = None, groups: int | None = None) -> int:
    """Draws from the guide per data point in one step of ``objective``: ``particles``
    (default :data:`DEFAULT_PARTICLES`), times the ``groups`` (default :data:`DEFAULT_GROUPS`)
    of ``miwae``/``piwae``."""
    k = DEFAULT_PARTICLES[objective] if particles is None else int(particles)
    if objective in GROUPED_OBJECTIVES:
        k *= DEFAULT_GROUPS if groups is None else int(groups)
    return k


def make_elbo(name: str, num_particles: int | None = None, alpha: float | None = None,
              groups: int | None = None, ciwae_beta: float | None = None) -> ELBO:
    """Build the estimator called ``name`` (one of :data:`OBJECTIVES`).

    ``num_particles`` defaults per objective (:data:`DEFAULT_PARTICLES`); for
    ``miwae``/``piwae`` it is the number ``L`` of draws in each of the ``groups``
    (``M``, default :data:`DEFAULT_GROUPS`), and the estimator draws ``M L`` per
    point.  ``alpha`` is required by ``renyi`` (any value but 1) and fixed to 0 by
    ``iwae`` and ``iwae-dreg``; ``ciwae_beta`` in [0, 1] weights the ELBO in ``ciwae``
    (default :data:`DEFAULT_CIWAE_BETA`).  An option given to an objective it does
    not apply to is refused by name.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    k = DEFAULT_PARTICLES[name] if num_particles is None else int(num_particles)
    if k < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if groups is not None and name not in GROUPED_OBJECTIVES:
        raise ValueError(f"groups applies to objectives {' and '.join(GROUPED_OBJECTIVES)} only; got groups={groups!r} "
                         f"with objective {name!r}")
    if ciwae_beta is not None and name != "ciwae":
        raise ValueError(f"ciwae_beta applies to objective 'ciwae' only; got ciwae_beta={ciwae_beta!r} with "
                         f"objective {name!r} (the beta-VAE weight is beta)")
    if alpha is not None and name in ("stl", "miwae", "ciwae", "piwae"):
        raise ValueError(f"alpha applies to objective 'renyi' only; got alpha={alpha!r} with objective {name!r}")
    if name in GROUPED_OBJECTIVES:
        m = DEFAULT_GROUPS if groups is None else int(groups)
        if m < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        k = m * k
    common = dict(num_particles=k, max_plate_nesting=MAX_PLATE_NESTING, vectorize_particles=k > 1)
    if name == "trace":
        return Trace_ELBO(**common)
    if name == "meanfield":
        return TraceMeanField_ELBO(**common)
    if name in ("iwae", "iwae-dreg"):
        if alpha not in (None, 0, 0.0):
            raise ValueError(f"{name} is the IWAE bound, alpha=0; got alpha={alpha!r} (use --objective renyi)")
        if name == "iwae-dreg":
            from pyro_vae.infer.dreg import DReG_IWAE_ELBO

            return DReG_IWAE_ELBO(**common)
        return DifferentiableRenyiELBO(alpha=0.0, **common)
    if name == "stl":
        from pyro_vae.infer.stl import STL_ELBO

        return STL_ELBO(**common)
    if name in ("miwae", "ciwae", "piwae"):
        from pyro_vae.infer.tighter import CIWAE_ELBO, MIWAE_ELBO, PIWAE_ELBO

        if name == "ciwae":
            return CIWAE_ELBO(beta=DEFAULT_CIWAE_BETA if ciwae_beta is None else ciwae_beta, **common)
        return (MIWAE_ELBO if name == "miwae" else PIWAE_ELBO)(groups=m, **common)
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
