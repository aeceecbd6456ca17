"""MIWAE, CIWAE and PIWAE: importance-weighted objectives that keep the guide's gradient informative.

Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh 2018, "Tighter Variational
Bounds are Not Necessarily Better": the signal-to-noise ratio of the IWAE
gradient of the guide's parameters falls like ``1 / sqrt(K)``, while the
model's rises like ``sqrt(K)``.  Three objectives trade the two off
(docs/derivations.md, PIWAE, MIWAE and CIWAE):

* MIWAE (D48): the mean of ``M`` IWAE bounds of ``L`` draws each, ``M L`` draws per point;
* CIWAE (D49): ``beta ELBO + (1 - beta) IWAE`` on the same ``K`` draws;
* PIWAE (D50): the model steps on the IWAE bound of all ``M L`` draws, the guide on
  MIWAE of the same draws.

MIWAE and CIWAE are bounds with the usual reparameterized gradient;
PIWAE gives the two sides different gradients through the leaf copies of
:mod:`pyro_vae.infer.pathwise`.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch

from pyro_vae.infer.bounds import ciwae_bound, iwae_bound, miwae_bound
from pyro_vae.infer.estimators import WeightedEstimator
from pyro_vae.infer.pathwise import bound_derivative, leaf_log_weights, path_term


def _check_groups(groups: int, num_particles: int) -> int:
    try:
        m = operator.index(groups) if not isinstance(groups, bool) else 0
    except TypeError:
        m = 0
    if m < 1 or num_particles % m:
        raise ValueError(f"groups must be a positive integer dividing num_particles={num_particles} "
                         f"(M groups of L draws, M L = num_particles), got {groups!r}")
    return m


class MIWAE_ELBO(WeightedEstimator):
    """MIWAE bound ``(1/M) sum_m log (1/L) sum_l w_ml`` over ``num_particles = M L`` draws per point,
    in ``M = groups`` consecutive groups of ``L``, with its reparameterized gradient
    (Rainforth et al. 2018; (D48) in docs/derivations.md, PIWAE, MIWAE and CIWAE).

    In expectation it is the ``L``-draw IWAE bound and its gradient the IWAE-``L`` gradient,
    with ``M`` independent estimates averaged.
    """

    def __init__(self, groups: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = _check_groups(groups, self.num_particles)

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return miwae_bound(log_weights, self.groups)


class CIWAE_ELBO(WeightedEstimator):
    """CIWAE bound ``beta ELBO + (1 - beta) IWAE`` on the same ``num_particles`` draws, ``beta`` in
    [0, 1], with its reparameterized gradient (Rainforth et al. 2018; (D49) in
    docs/derivations.md, PIWAE, MIWAE and CIWAE).

    ``beta`` is the weight of the ELBO, not the beta-VAE weight on the KL (that is a
    :func:`~pyro_vae.infer.scale.latent_scale` around the call, as for every estimator).
    """

    def __init__(self, beta: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"the CIWAE weight beta must be a number in [0, 1], got {beta!r}")
        self.beta = beta

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return ciwae_bound(log_weights, self.beta)


class PIWAE_ELBO(WeightedEstimator):
    """PIWAE: the IWAE bound of all ``num_particles = M L`` draws for the model's parameters and the
    MIWAE bound of the same draws, ``M = groups`` groups of ``L``, for the guide's (Rainforth et al.
    2018; (D50) in docs/derivations.md, PIWAE, MIWAE and CIWAE).

    The loss value is minus the IWAE bound (the model's target).  Surrogate, on log-weights
    with the model replayed on leaf copies ``z'`` of the draws and the guide's density at its
    own draws (:func:`~pyro_vae.infer.pathwise.leaf_log_weights`, ``density_at="draws"``)::

        -[ IWAE(log p(x, z') - sg(log q(z)))                     model: the IWAE gradient
           + sum <z, d MIWAE / d z'> - sg(...)                  guide: the path through log p
           + MIWAE(sg(log p(x, z')) - log q(z)) - sg(...) ]     guide: through its own density

    so the guide's parameters get the reparameterized MIWAE gradient in full (path and
    score terms) and the model's the IWAE gradient.  Parameters both share get both parts.
    """

    bound_gradient = False

    def __init__(self, groups: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = _check_groups(groups, self.num_particles)

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return iwae_bound(log_weights)

    def surrogate_loss(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        weights = leaf_log_weights(self, model, guide, args, kwargs, density_at="draws")
        path = path_term(weights, bound_derivative(lambda lw: miwae_bound(lw, self.groups), weights.log_weight))
        density = miwae_bound(weights.guide_side(), self.groups).sum()
        return -(iwae_bound(weights.model_side()).sum() + path + (density - density.detach()))


__all__ = ["CIWAE_ELBO", "MIWAE_ELBO", "PIWAE_ELBO"]
