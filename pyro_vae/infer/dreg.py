"""The IWAE bound with doubly reparameterized gradients (DReG) for the guide.

Tucker, Lawson, Gu & Maddison 2018, "Doubly Reparameterized Gradient
Estimators for Monte Carlo Objectives" (ICLR 2019): the IWAE gradient of the
guide's parameters ``sum_k w~_k d log w_k / d phi`` hides score terms
``-w~_k d log q_phi(z_k) / d phi`` (at fixed ``z_k``) whose variance does not
shrink as the bound tightens.  Reparameterizing them a second time gives

    grad_phi = sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d phi),

``d log w_k / d z_k`` taken with ``phi`` held fixed in ``q``'s density (D47 in
docs/derivations.md, Doubly reparameterized IWAE gradient), an unbiased
estimator of the IWAE gradient whose signal-to-noise ratio does not vanish as
``K`` grows.  The model's parameters keep the IWAE gradient
``sum_k w~_k d log p(x, z_k) / d theta`` (D46).
"""

from __future__ import annotations

from typing import Callable

import torch

from pyro_vae.infer.bounds import iwae_bound, self_normalized_weights
from pyro_vae.infer.estimators import WeightedEstimator
from pyro_vae.infer.fast import UnsupportedProgram
from pyro_vae.infer.pathwise import leaf_log_weights, path_term


def guide_scale(guide_sites: dict[str, dict]) -> float | torch.Tensor:
    """The one scale ``s`` of every latent site of the guide: 0 where masked out (a latent scale of
    0), else the sites' common ``scale``.  Sites with different scales, or a mask tensor, are
    :class:`~pyro_vae.infer.fast.UnsupportedProgram`: the second reparameterization needs the
    scaled density ``s log q`` of the whole guide."""
    scale, first = None, None
    for name, site in guide_sites.items():
        mask = site["mask"]
        if mask is not None and not isinstance(mask, bool):
            raise UnsupportedProgram(f"guide site {name!r} has a mask tensor; DReG needs one scale for the whole "
                                     "guide density")
        s = 0.0 if mask is False else site["scale"]
        if scale is None:
            scale, first = s, name
        elif s is not scale and not (not torch.is_tensor(s) and not torch.is_tensor(scale) and s == scale):
            raise UnsupportedProgram(f"guide sites {first!r} and {name!r} have different scales ({scale!r} and "
                                     f"{s!r}); DReG needs one scale for the whole guide density")
    return 1.0 if scale is None else scale


class DReG_IWAE_ELBO(WeightedEstimator):
    """IWAE bound (``RenyiELBO(alpha=0)``'s value) with the doubly reparameterized guide gradient
    (Tucker et al. 2018; (D47) in docs/derivations.md, Doubly reparameterized IWAE gradient).

    Surrogate loss, on log-weights evaluated at leaf copies ``z'`` of the draws
    (:func:`~pyro_vae.infer.pathwise.leaf_log_weights`)::

        -[ IWAE(log p(x, z') - sg(log q(z'))) + sum_k <z_k, c_k d log w_k / d z'_k> - sg(...) ]

    so the model's parameters get the IWAE gradient (D46) and the guide's get
    ``sum_k c_k (d log w_k / d z_k)(d z_k / d phi)`` with ``c_k = w~_k^2``.  Under a latent
    scale ``s`` on the guide's density (beta, KL warm-up) the score terms carry ``s``, and
    their reparameterization gives ``c_k = (1 - s) w~_k + s w~_k^2``: the unbiased gradient
    of the scaled bound (``s = 0`` leaves the plain path gradient).  Parameters the model
    and the guide share get both parts.
    """

    bound_gradient = False

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return iwae_bound(log_weights)

    def surrogate_loss(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        weights = leaf_log_weights(self, model, guide, args, kwargs, density_at="leaves")
        log_weight = weights.log_weight
        w = self_normalized_weights(log_weight.detach())
        s = guide_scale(weights.guide_sites[0])
        coefficient = w * w if isinstance(s, float) and s == 1.0 else (1 - s) * w + s * w * w
        guide_part = path_term(weights, coefficient)
        return -(iwae_bound(weights.model_side()).sum() + guide_part)


__all__ = ["DReG_IWAE_ELBO", "guide_scale"]
