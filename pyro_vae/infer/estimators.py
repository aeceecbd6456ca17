"""Importance-weighted objectives that bring their own gradient estimator.

Pyro's estimators pair each objective with one gradient: autograd of the Monte
Carlo bound.  The estimators of :mod:`pyro_vae.infer.stl`,
:mod:`pyro_vae.infer.dreg` and :mod:`pyro_vae.infer.tighter` keep the value of
a bound of the per-particle log-weights ``log w_k = log p(x, z_k) - log q(z_k | x)``
but may estimate its gradient differently.  Their ``differentiable_loss``
returns a surrogate: a tensor whose value is minus the bound (summed over the
data, as Pyro sums) and whose ``.backward()`` gives the estimator's gradient for
every parameter, so one ``torch.optim`` optimizer steps it like any loss.
Under ``torch.no_grad()`` (validation, evaluation) it returns the bound's value
alone.

They read the program with the lean runs of :mod:`pyro_vae.infer.fast` (no
``Trace``, validation off, the vectorized particle plate where Pyro puts it, so
the same RNG state gives Pyro's draws), take the log-weights from
:mod:`pyro_vae.infer.weights` and each bound from :mod:`pyro_vae.infer.bounds`.
:meth:`WeightedEstimator.pyro_loss` is the same bound on the log-weights of
Pyro's own traces (:func:`~pyro_vae.infer.objectives.pyro_log_weights`): the
reference :func:`~pyro_vae.infer.fast.make_loss_fn` checks the value against
once, and the gradients too where the estimator's gradient is the bound's own
(:attr:`WeightedEstimator.bound_gradient`).  Latent scales
(:func:`~pyro_vae.infer.scale.latent_scale`: beta, KL warm-up) reach the
log-weights as they reach every other estimator's.
"""

from __future__ import annotations

from typing import Callable

import torch
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled, torch_sum
from pyro.util import check_if_enumerated

from pyro_vae.infer.fast import _LeanEstimator
from pyro_vae.infer.objectives import pyro_log_weights


def plate_reduction(model_sites: dict[str, dict]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum a site's log-density over the plates not shared by all of the model's sites,
    as ``RenyiELBO`` sums them, leaving one log-weight per particle and data point."""
    sum_dims = get_dependent_plate_dims(model_sites.values())
    return lambda log_prob: torch_sum(log_prob, sum_dims)


class WeightedEstimator(_LeanEstimator, ELBO):
    """A bound of the ``(K, ...)`` per-particle log-weights with its own gradient estimator.

    Subclasses give :meth:`bound` (the bound per data point, reducing the particle
    dimension 0) and, when their gradient is not the bound's own,
    :meth:`surrogate_loss`.  The loss is the sum over the data plate, like
    ``differentiable_loss`` of Pyro's estimators.
    """

    #: ``True`` when the gradient is autograd of :meth:`bound` itself; ``False`` when the
    #: estimator replaces it by another estimator of that gradient (or of another one).
    bound_gradient: bool = True

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        """The bound per data point from ``(K, ...)`` log-weights."""
        raise NotImplementedError

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """Minus the bound, summed over the data; its gradient is the estimator's (the value
        alone under ``torch.no_grad()``)."""
        if not torch.is_grad_enabled():
            return -self.bound(self.log_weights(model, guide, args, kwargs)).sum()
        return self.surrogate_loss(model, guide, args, kwargs)

    def surrogate_loss(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """The loss with gradients enabled; by default minus the bound, whose gradient is its own."""
        return -self.bound(self.log_weights(model, guide, args, kwargs)).sum()

    def log_weights(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """``(K, ...)`` log-weights from the lean runs of the guide and the model replayed on its draws."""
        return self._particle_weights(model, guide, args, kwargs, plate_reduction)

    def pyro_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """Minus the same bound of the log-weights of Pyro's own traces: the value this estimator's loss
        must have (and, when :attr:`bound_gradient`, the gradient too)."""
        return -self.bound(pyro_log_weights(self, model, guide, *args, **kwargs)).sum()

    def _get_trace(self, model, guide, args, kwargs):
        """One flat importance trace pair, as ``Trace_ELBO`` takes it (for :meth:`pyro_loss`)."""
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace


__all__ = ["WeightedEstimator", "plate_reduction"]
