"""The ELBO with the sticking-the-landing (STL) gradient for the guide.

Roeder, Wu & Duvenaud 2017, "Sticking the Landing: Simple, Lower-Variance
Gradient Estimators for Variational Inference": the reparameterized ELBO
gradient of the guide's parameters is a path term plus a score term
``-d log q_phi(z) / d phi`` at fixed ``z`` whose mean is zero (D44).  Dropping
it, i.e. holding ``phi`` fixed in ``q``'s density,

    grad_phi = (d/dz [log p(x, z) - log q_phi(z | x)]) (d z / d phi),

stays unbiased and is exactly zero when the guide equals the posterior, where
``log w`` is constant in ``z`` (D45 in docs/derivations.md, Sticking the
landing).  The model's parameters keep the ELBO gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from pyro_vae.infer.bounds import elbo_bound
from pyro_vae.infer.estimators import WeightedEstimator
from pyro_vae.infer.pathwise import bound_derivative, leaf_log_weights, path_term


class STL_ELBO(WeightedEstimator):
    """Monte Carlo ELBO over ``K`` particles (``Trace_ELBO``'s value) with the sticking-the-landing
    guide gradient (Roeder et al. 2017; (D45) in docs/derivations.md, Sticking the landing).

    Surrogate loss, on log-weights evaluated at leaf copies ``z'`` of the draws
    (:func:`~pyro_vae.infer.pathwise.leaf_log_weights`)::

        -[ ELBO(log p(x, z') - sg(log q(z'))) + sum_k <z_k, (1/K) d log w_k / d z'_k> - sg(...) ]

    so the model's parameters get the ELBO gradient and the guide's the path term alone.
    The score term has mean zero at any scale of the guide's density, so the estimator
    stays unbiased under a latent scale (beta, KL warm-up).
    """

    bound_gradient = False

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return elbo_bound(log_weights)

    def surrogate_loss(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        weights = leaf_log_weights(self, model, guide, args, kwargs, density_at="leaves")
        guide_part = path_term(weights, bound_derivative(elbo_bound, weights.log_weight))
        return -(elbo_bound(weights.model_side()).sum() + guide_part)


__all__ = ["STL_ELBO"]
