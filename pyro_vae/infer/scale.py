"""beta-VAE and KL warm-up as an effect handler on the latent sites.

``latent_scale(beta)`` multiplies the log-density of every *latent* sample
site (unobserved, not a plate's subsample site) by ``beta``, in whichever
program runs under it.  Put it around the whole estimator call, so that it
covers the model *and* the guide::

    with latent_scale(beta):
        loss = elbo.differentiable_loss(model, guide, x)

Scaling both sides turns the ELBO into the beta-VAE objective
``E_q[log p(x | z)] - beta KL(q(z | x) || p(z))`` (Higgins et al. 2017):
``Trace_ELBO`` sees ``beta log p(z) - beta log q(z | x)`` and
``TraceMeanField_ELBO`` scales the analytic KL by the guide site's scale.
Scaling one side only is a different objective under ``Trace_ELBO`` and
ignored by ``TraceMeanField_ELBO``.  ``beta = 0`` masks the latent sites (a
scale of zero is not allowed by Pyro), which leaves the reconstruction term.
The scale is an argument of the handler, not state kept on the model, so
nothing has to be saved or restored around an evaluation.
"""

from __future__ import annotations

import math

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample


def is_latent_message(msg: dict) -> bool:
    """A sample site that is neither observed nor a plate's subsample site."""
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


class LatentScaleMessenger(Messenger):
    """Scale (``scale > 0``) or mask (``scale == 0``) the latent sites' log-densities."""

    def __init__(self, scale: float) -> None:
        scale = float(scale)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"latent scale must be a finite number >= 0, got {scale!r}")
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if self.scale == 1.0 or not is_latent_message(msg):
            return
        if self.scale == 0.0:
            msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
        else:
            msg["scale"] = self.scale * msg["scale"]


def latent_scale(fn=None, scale: float = 1.0):
    """Handler (or decorator, like ``poutine.scale``) scaling latent sites by ``scale``."""
    messenger = LatentScaleMessenger(scale)
    return messenger if fn is None else messenger(fn)


def current_latent_scale() -> float:
    """The product of the scales of every active :class:`LatentScaleMessenger` (1 when none).

    Estimators that compute a model/guide pair's density without running it
    (:mod:`pyro_vae.infer.direct`) read the scale from here, so they apply the
    same objective as the traced programs would.
    """
    scale = 1.0
    for frame in _PYRO_STACK:
        if isinstance(frame, LatentScaleMessenger):
            scale *= frame.scale
    return scale
