"""Per-data-point importance log-weights from the Pyro model and guide.

``pyro.infer.importance.vectorized_importance_weights`` sums the data plate
away; test log-likelihoods and per-point diagnostics need one weight per data
point *and* per particle.  :func:`log_weights` runs the guide under a particle
plate, replays the model against it, and keeps each site's log-density per
data point, so it works for any prior, guide and decoder that follows the
model/guide contract of :mod:`pyro_vae.vae`.
"""

from __future__ import annotations

import torch

import pyro
from pyro import poutine

from .vae import VAE

PARTICLE_PLATE = "_particles"


def log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None,
                num_particles: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-weights ``log p(x, z_k) - log q(z_k | x)`` with ``z_k ~ q(z | x)``.

    Returns ``(log_w, log_likelihood, log_prior_ratio)``, each of shape
    ``(num_particles, B)``: the weight, its reconstruction part
    ``log p(x | z_k)``, and its latent part ``log p(z_k) - log q(z_k | x)``
    (minus a one-sample KL estimate).  Evaluated at ``kl_scale = 1`` whatever
    the VAE was trained with, so these are weights of the true model.
    """
    saved_scale, vae.kl_scale = vae.kl_scale, 1.0
    try:
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-2):
            guide_trace = poutine.trace(vae.guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, y)
    finally:
        vae.kl_scale = saved_scale
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    shape = (num_particles, x.shape[0])
    recon = x.new_zeros(shape)
    latent = x.new_zeros(shape)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            recon = recon + site["log_prob"]
        else:
            latent = latent + site["log_prob"]
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            latent = latent - site["log_prob"]
    return recon + latent, recon, latent
