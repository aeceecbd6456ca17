"""Schedules applied between steps: the KL weight of beta-VAE with linear warm-up."""

from __future__ import annotations


def kl_scale_at(step: int, beta: float = 1.0, warmup_steps: float = 0.0) -> float:
    """Weight on the latent site at ``step``: ``beta * min(1, step / warmup_steps)``.

    ``beta`` is the beta-VAE weight (Higgins et al. 2017); the linear warm-up (Bowman et
    al. 2016; Sonderby et al. 2016) ramps it from 0 over ``warmup_steps`` steps.
    The trainer applies it with ``poutine.scale`` on the latent site of both the
    model and the guide.
    """
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup_steps)
