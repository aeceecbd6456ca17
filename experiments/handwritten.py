"""A plain-PyTorch VAE over the same networks as a pyro-vae program: the speed reference.

No Pyro, no distribution objects: the estimators are written out with tensor
ops, the way one writes a VAE by hand.  They are the *same* estimators that
pyro-vae's objectives compute (so a speed ratio compares like with like):

* ``trace``     -- single-sample reparameterized ELBO (Kingma & Welling 2014, the
  SGVB estimator A) with the KL as the Monte Carlo term ``log q(z|x) - log p(z)``
  (what ``Trace_ELBO`` does);
* ``meanfield`` -- the SGVB estimator B with the closed-form Gaussian KL (what
  ``TraceMeanField_ELBO`` does for a diagonal Gaussian guide and N(0, I) prior);
* ``iwae``      -- the importance-weighted bound (Burda et al. 2016) with K vectorized
  particles, ``log (1/K) sum_k w_k`` (``RenyiELBO(alpha=0)``).

The networks are an encoder (outputs ``[mu, log sigma^2]``) and a decoder
(Bernoulli logits): a pyro-vae VAE's ``encoder.net`` and ``decoder.net``, or
the modules of a user's plain ``model``/``guide`` functions, copied with the
same weights.

:func:`importance_log_likelihood` is the hand-written importance-sampled
``log p(x)`` (Burda et al. 2016) with particles in chunks, so its memory is
bounded by ``chunk_size * batch_size * d`` whatever ``K``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HANDWRITTEN_OBJECTIVES = ("trace", "meanfield", "iwae")
_LOG_2PI = math.log(2.0 * math.pi)


def _encode(encoder_net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loc, log_var = encoder_net(x).chunk(2, dim=-1)
    return loc, log_var


def negative_elbo_sum(encoder_net: nn.Module, decoder_net: nn.Module, x: torch.Tensor,
                      objective: str = "trace", num_particles: int = 1) -> torch.Tensor:
    """Negative bound summed over the batch (Pyro's convention; divide by B for nats per point).

    ``objective`` is ``trace``, ``meanfield`` (one particle each) or ``iwae``
    with ``num_particles`` vectorized draws per point.
    """
    if objective not in HANDWRITTEN_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(HANDWRITTEN_OBJECTIVES)}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    loc, log_var = _encode(encoder_net, x)
    std = (0.5 * log_var).exp()
    if objective == "iwae":
        eps = torch.randn((num_particles, *loc.shape), dtype=loc.dtype, device=loc.device)
        z = loc + std * eps
        logits = decoder_net(z)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        # log p(z) - log q(z|x); the Gaussian constants cancel and (z - mu) / sigma = eps.
        log_pz_minus_qz = 0.5 * (eps.pow(2) - z.pow(2) + log_var).sum(-1)
        log_w = log_px_z + log_pz_minus_qz
        return -(torch.logsumexp(log_w, dim=0) - math.log(num_particles)).sum()
    if num_particles != 1:
        raise ValueError(f"the hand-written {objective} estimator uses one particle, got {num_particles}")
    eps = torch.randn_like(loc)
    z = loc + std * eps
    logits = decoder_net(z)
    reconstruction = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    if objective == "trace":
        kl = 0.5 * (z.pow(2) - eps.pow(2) - log_var).sum()  # log q(z|x) - log p(z) at the draw
    else:
        kl = 0.5 * (loc.pow(2) + log_var.exp() - log_var - 1.0).sum()  # closed-form KL to N(0, I)
    return kl - reconstruction


class HandwrittenTrainer:
    """One ``torch.optim`` optimizer and a hand-written loss: ``step(x)`` is one SGD step.

    ``optimizer_factory(params)`` must build the same optimizer the pyro-vae
    side uses, so the comparison measures the loss and nothing else.
    """

    def __init__(self, encoder_net: nn.Module, decoder_net: nn.Module, objective: str, num_particles: int,
                 optimizer_factory) -> None:
        self.encoder_net = encoder_net
        self.decoder_net = decoder_net
        self.objective = objective
        self.num_particles = num_particles
        self.optimizer = optimizer_factory([*encoder_net.parameters(), *decoder_net.parameters()])

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step on batch ``x``; returns the detached per-batch loss sum (no host sync)."""
        loss = negative_elbo_sum(self.encoder_net, self.decoder_net, x, self.objective,
                                 self.num_particles) / x.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach() * x.shape[0]


@torch.no_grad()
def importance_log_likelihood(encoder_net: nn.Module, decoder_net: nn.Module, x: torch.Tensor,
                              num_particles: int = 5000, chunk_size: int = 500,
                              batch_size: int = 100) -> torch.Tensor:
    """Per-point importance-sampled ``log p(x) ~ log (1/K) sum_k p(x, z_k) / q(z_k | x)``.

    Diagonal Gaussian guide, N(0, I) prior, Bernoulli decoder.  Particles are
    drawn ``chunk_size`` at a time and combined with a running ``logsumexp``,
    so peak memory is ``O(chunk_size * batch_size * d)`` for any ``K``.
    Returns a tensor of shape ``(N,)``.
    """
    if num_particles < 1 or chunk_size < 1 or batch_size < 1:
        raise ValueError(f"num_particles, chunk_size and batch_size must be positive, got "
                         f"{num_particles}, {chunk_size}, {batch_size}")
    # Results go into one preallocated tensor: a small tensor kept per batch would sit between
    # the big per-chunk blocks on the heap and stop it from shrinking (RSS grew ~3 MB per point).
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        loc, log_var = _encode(encoder_net, xb)
        std = (0.5 * log_var).exp()
        running = torch.full((xb.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
        for first in range(0, num_particles, chunk_size):
            k = min(chunk_size, num_particles - first)
            eps = torch.randn((k, *loc.shape), dtype=loc.dtype, device=loc.device)
            z = loc + std * eps
            logits = decoder_net(z)
            log_px_z = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
            log_w = log_px_z + 0.5 * (eps.pow(2) - z.pow(2) + log_var).sum(-1)
            running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        out[start:start + batch_size] = running - math.log(num_particles)
    return out


@torch.no_grad()
def validation_bound(encoder_net: nn.Module, decoder_net: nn.Module, x: torch.Tensor, objective: str = "trace",
                     num_particles: int = 1, batch_size: int = 1000) -> float:
    """Mean per-point bound of ``objective`` over ``x`` (nats), in batches: the number a training
    script prints after each epoch.  One host read at the end."""
    total = x.new_zeros(())
    for start in range(0, x.shape[0], batch_size):
        total += negative_elbo_sum(encoder_net, decoder_net, x[start:start + batch_size], objective, num_particles)
    return -float(total) / x.shape[0]


def train_script(encoder_net: nn.Module, decoder_net: nn.Module, x_train: torch.Tensor, x_valid: torch.Tensor,
                 objective: str, num_particles: int, batch_size: int, epochs: int, optimizer_factory,
                 checkpoint: str | None = None, seed: int = 0) -> list[float]:
    """A hand-written training script: ``epochs`` passes over ``x_train`` in shuffled mini-batches
    (index slices of one device tensor, the last batch partial), then per epoch the validation ELBO
    (and the objective's own bound when it is not the single-sample ELBO) and, when
    ``checkpoint`` names a file, ``torch.save`` of the networks and the optimizer.

    Returns the per-epoch validation ELBOs.  With ``checkpoint=None`` and ``x_valid`` empty it is
    the bare loop: steps only.
    """
    trainer = HandwrittenTrainer(encoder_net, decoder_net, objective, num_particles, optimizer_factory)
    gen = torch.Generator(device=x_train.device).manual_seed(seed)
    n = x_train.shape[0]
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen, device=x_train.device)
        epoch_loss = x_train.new_zeros(())
        for start in range(0, n, batch_size):
            epoch_loss += trainer.step(x_train[perm[start:start + batch_size]])
        float(epoch_loss)  # the epoch's training loss, read once, as a script prints it
        if x_valid.shape[0]:
            history.append(validation_bound(encoder_net, decoder_net, x_valid))
            if objective != "trace" or num_particles != 1:
                validation_bound(encoder_net, decoder_net, x_valid, objective, num_particles,
                                 batch_size=max(1, 1000 // num_particles))
        if checkpoint is not None:
            torch.save({"encoder": encoder_net.state_dict(), "decoder": decoder_net.state_dict(),
                        "optimizer": trainer.optimizer.state_dict()}, checkpoint)
    return history
