"""The built-in VAE's estimators computed straight from its parts, without running Pyro.

For the library's own :class:`~pyro_vae.models.vae.VAE` the program is fixed:
one latent site ``z`` from ``vae.prior(B, c)`` / ``vae.encoder(x, c)``, one
observed site ``x`` from ``vae.decoder(z, c)``, one data plate, the latent site
scaled in both programs by the active :func:`~pyro_vae.infer.scale.latent_scale`.
:class:`DirectLoss` computes a Pyro estimator's loss from the parts:

* the guide draw is ``q.expand((K, B)).rsample()`` for ``K`` vectorized
  particles (``q.rsample()`` for one), what Pyro's particle plate samples, so
  the same RNG state gives the same ``z``;
* ``trace``: ``-sum_n elbo_bound(log w_n)`` with ``log w = s log p(z) + log p(x|z) - s log q(z|x)``;
* ``meanfield``: ``-sum_n sgvb_estimator(log p(x_n|z), KL_n, beta=s)`` with the closed-form
  KL where one exists, else the Monte Carlo term of ``trace``, as
  ``TraceMeanField_ELBO`` falls back;
* ``renyi``/``iwae``: ``-sum_n renyi_bound(log w_n, alpha)``;

with ``s = current_latent_scale()`` applied as ``poutine.scale`` applies it
(:mod:`pyro_vae.infer.bounds` holds the bounds).  With one particle and the
object-free parts, ``trace`` and ``meanfield`` sum each term over the batch as
they compute it (the Bernoulli log-likelihood in the cross-entropy's own
reduction, ``log q`` from the draw's noise): the same loss and gradients up to
rounding, with no per-pixel tensor kept for the backward pass.  It never calls
``.item()`` and skips argument validation (:func:`~pyro_vae.infer.fast.make_loss_fn` checks it
once against the validated Pyro estimator).

For the parts of :data:`FAST_PRIORS`, :data:`FAST_GUIDES` and
:data:`FAST_DECODERS` it also skips building ``torch.distributions`` objects:
:class:`DiagonalNormal`, :class:`StandardNormal` and :class:`BernoulliLogits`
evaluate the expressions of ``Normal(loc, scale).to_event(1)``, ``N(0, I)`` and
``Bernoulli(logits=...).to_event(1)`` through :mod:`pyro_vae.infer.densities`
-- the same floats, to the bit -- with fewer small tensor ops and none of the
classes' per-call Python (docs/performance.md).  :func:`direct_log_weights`
gives importance weights the same way.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pyro
import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.runtime import _PYRO_STACK

from pyro_vae.infer.bounds import elbo_bound, renyi_bound, sgvb_estimator
from pyro_vae.infer.densities import (
    bernoulli_log_likelihood,
    diagonal_gaussian_log_density,
    reparameterize,
    standard_normal_log_density,
)
from pyro_vae.infer.kl import diagonal_gaussian_kl, gaussian_kl_to_standard_normal
from pyro_vae.infer.objectives import DifferentiableRenyiELBO
from pyro_vae.infer.scale import LatentScaleMessenger, current_latent_scale
from pyro_vae.models.decoders import BernoulliDecoder, GaussianDecoder
from pyro_vae.models.guides import DiagonalGaussianEncoder
from pyro_vae.models.priors import StandardNormalPrior
from pyro_vae.models.vae import VAE

# -- distributions without the objects ---------------------------------------------------------


class DiagonalNormal:
    """``Normal(loc, scale).to_event(1)``, optionally expanded to ``particles`` draws per point.

    ``rsample`` draws ``eps = empty(shape).normal_()`` as ``Normal.rsample`` does,
    so the same RNG state gives the same ``z``.
    """

    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, particles: int = 1) -> None:
        self.loc, self.scale, self.particles = loc, scale, particles

    def expand(self, batch_shape: tuple[int, int]) -> "DiagonalNormal":
        """The particle plate's ``(K, B)`` expansion: only the particle count changes."""
        return DiagonalNormal(self.loc, self.scale, batch_shape[0])

    def rsample(self) -> torch.Tensor:
        return self.rsample_with_noise()[0]

    def rsample_with_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The draw ``z = loc + scale * eps`` and its noise ``eps``."""
        shape = self.loc.shape if self.particles == 1 else (self.particles, *self.loc.shape)
        eps = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device).normal_()
        return reparameterize(self.loc, self.scale, eps), eps

    def log_prob(self, value: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per point; ``noise``: ``value`` is this distribution's draw with that noise."""
        return diagonal_gaussian_log_density(value, self.loc, self.scale, noise)

    def total_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The log-density summed over the batch too."""
        return self.log_prob(value).sum()


class BernoulliLogits:
    """``Bernoulli(logits=logits).to_event(1)``'s log-density."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return bernoulli_log_likelihood(value, self.logits)

    def total_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The log-likelihood summed over the batch too, in one reduction."""
        return bernoulli_log_likelihood(value, self.logits, total=True)


class StandardNormal:
    """N(0, I) over the last dimension, with ``loc = 0`` and ``scale = 1`` folded in."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_density(value)


def diagonal_normal_kl(q: DiagonalNormal, p: DiagonalNormal | StandardNormal) -> torch.Tensor:
    """KL(q || p) per point, closed form: :func:`~pyro_vae.infer.kl.gaussian_kl_to_standard_normal`
    or :func:`~pyro_vae.infer.kl.diagonal_gaussian_kl`."""
    if isinstance(p, StandardNormal):
        return gaussian_kl_to_standard_normal(q.loc, q.scale)
    return diagonal_gaussian_kl(q.loc, q.scale, p.loc, p.scale)


#: Part class -> its distribution without the objects.  Exact classes only (a subclass may
#: change ``forward``); every entry must reproduce that class's ``forward`` term for term,
#: and :func:`~pyro_vae.infer.fast.make_loss_fn` verifies it against Pyro before training uses it.
FAST_PRIORS: dict[type, Callable[[Any, int, torch.Tensor | None], Any]] = {
    # N(0, I) by definition: its zero/one buffers only carry the device.
    StandardNormalPrior: lambda prior, batch, c: StandardNormal(),
}
FAST_GUIDES: dict[type, Callable[[Any, torch.Tensor, torch.Tensor | None], DiagonalNormal]] = {
    DiagonalGaussianEncoder: lambda encoder, x, c: _diagonal_from_log_var(*encoder.encode(x, c)),
}
FAST_DECODERS: dict[type, Callable[[Any, torch.Tensor, torch.Tensor | None], Any]] = {
    BernoulliDecoder: lambda decoder, z, c: BernoulliLogits(decoder.features(z, c)),
    GaussianDecoder: lambda decoder, z, c: DiagonalNormal(decoder.features(z, c), decoder.sigma),
}


def _diagonal_from_log_var(loc: torch.Tensor, log_var: torch.Tensor) -> DiagonalNormal:
    return DiagonalNormal(loc, (0.5 * log_var).exp())


def has_fast_parts(vae: VAE) -> bool:
    """Whether all three parts of ``vae`` have an entry in the fast-part registries."""
    return (type(vae.prior) in FAST_PRIORS and type(vae.encoder) in FAST_GUIDES
            and type(vae.decoder) in FAST_DECODERS)


def bound_vae(model: Callable, guide: Callable) -> VAE | None:
    """The built-in VAE whose own (not overridden) ``model`` and ``guide`` these are, else ``None``."""
    vae = getattr(model, "__self__", None)
    if not isinstance(vae, VAE) or getattr(guide, "__self__", None) is not vae:
        return None
    if getattr(model, "__func__", None) is not VAE.model or getattr(guide, "__func__", None) is not VAE.guide:
        return None
    return vae


def direct_latent_scale() -> float | None:
    """The active latent scale (as :func:`~pyro_vae.infer.scale.current_latent_scale`), or ``None``
    when another handler is active too: the direct computations reproduce only
    :func:`~pyro_vae.infer.scale.latent_scale`.  One pass over the handler stack."""
    scale = 1.0
    for frame in _PYRO_STACK:
        if not isinstance(frame, LatentScaleMessenger):
            return None
        scale *= frame.scale
    return scale


def fast_parts_of(vae: VAE) -> tuple[Callable, Callable, Callable] | None:
    """The registries' (guide, prior, decoder) entries for ``vae``'s parts, or ``None``."""
    if not has_fast_parts(vae):
        return None
    return FAST_GUIDES[type(vae.encoder)], FAST_PRIORS[type(vae.prior)], FAST_DECODERS[type(vae.decoder)]


# -- which estimators --------------------------------------------------------------------------

def estimator_kind(elbo: ELBO) -> str | None:
    """``trace``, ``meanfield`` or ``renyi`` for the estimators the direct loss reproduces, else ``None``.

    Exact types only: Pyro's ``JitTrace_ELBO`` and friends subclass these, and
    a user's subclass may change the estimator.
    """
    return {Trace_ELBO: "trace", TraceMeanField_ELBO: "meanfield",
            DifferentiableRenyiELBO: "renyi"}.get(type(elbo))


def unsupported_reason(elbo: ELBO, vae: VAE) -> str | None:
    """Why :class:`DirectLoss` cannot stand in for ``elbo`` on ``vae``; ``None`` if it can."""
    if not isinstance(vae, VAE):
        return f"{type(vae).__name__} is not a pyro_vae VAE"
    if type(vae).model is not VAE.model or type(vae).guide is not VAE.guide:
        return f"{type(vae).__name__} overrides model or guide"
    if estimator_kind(elbo) is None:
        return f"no direct form of {type(elbo).__name__}"
    if elbo.num_particles > 1 and not elbo.vectorize_particles:
        return "sequential (non-vectorized) particles"
    # Pyro adds the particle plate's dim to max_plate_nesting when it vectorizes.
    data_plates = elbo.max_plate_nesting - (1 if elbo.vectorize_particles else 0)
    if data_plates != 1:
        return f"max_plate_nesting={elbo.max_plate_nesting} (the direct loss assumes the one data plate)"
    return None


# -- the parts' densities ------------------------------------------------------------------------

class DirectDraw(NamedTuple):
    """One pass through the parts: the guide ``q`` (expanded to the particles), the prior ``p``,
    the draw ``z`` and ``log p(x | z)`` (per point, or summed over the batch), and the draw's
    noise when the object-free guide drew it."""

    q: Any
    q_particles: Any
    p: Any
    z: torch.Tensor
    log_px: torch.Tensor
    noise: torch.Tensor | None = None

    def log_q(self) -> torch.Tensor:
        """``log q(z | x)`` per point, from the draw's noise where it is known."""
        if self.noise is None:
            return self.q_particles.log_prob(self.z)
        return self.q_particles.log_prob(self.z, noise=self.noise)


def direct_draw(vae: VAE, x: torch.Tensor, y: torch.Tensor | None, num_particles: int,
                fast_parts: tuple[Callable, Callable, Callable] | None, particle_dim: bool,
                total: bool = False) -> DirectDraw | None:
    """The parts called in the guide's then the replayed model's order, through ``fast_parts``
    (:func:`fast_parts_of`) or the parts' own distributions; ``None`` if the guide cannot
    ``rsample``.  ``particle_dim`` keeps a particle dim of size 1 for one particle.
    ``total`` (object-free parts, one particle) sums ``log p(x | z)`` over the batch and keeps
    the guide's noise, for a loss that is a sum over the batch."""
    c = vae.condition(y)
    batch = x.shape[0]
    if fast_parts is not None:
        guide_fn, prior_fn, decoder_fn = fast_parts
        q = guide_fn(vae.encoder, x, c)
    else:
        q = vae.encoder(x, c)
        if not q.has_rsample:
            return None
    q_particles = q.expand((num_particles, batch)) if num_particles > 1 or particle_dim else q
    total = total and fast_parts is not None and num_particles == 1 and not particle_dim
    noise = None
    if total and isinstance(q_particles, DiagonalNormal):
        z, noise = q_particles.rsample_with_noise()
    else:
        z = q_particles.rsample()
    if particle_dim and num_particles == 1 and isinstance(q, DiagonalNormal):
        z = z.unsqueeze(0)  # the object-free guide draws (B, r) for one particle
    if fast_parts is not None:
        p = prior_fn(vae.prior, batch, c)
        likelihood = decoder_fn(vae.decoder, z, c)
        log_px = likelihood.total_log_prob(x) if total else likelihood.log_prob(x)
    else:
        p = vae.prior(batch, c)
        log_px = vae.decoder(z, c).log_prob(x)
    return DirectDraw(q, q_particles, p, z, log_px, noise)


def _scaled(log_density: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``latent_scale`` does to a site's log-density: ``poutine.scale``, or a mask at 0."""
    if scale == 1.0:
        return log_density
    return torch.zeros_like(log_density) if scale == 0.0 else log_density * scale


def _analytic_kl(q, p) -> torch.Tensor | None:
    """KL(q || p) per point where a closed form exists (as ``TraceMeanField_ELBO`` finds it), else None."""
    if isinstance(q, DiagonalNormal) and isinstance(p, (DiagonalNormal, StandardNormal)):
        return diagonal_normal_kl(q, p)
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


# -- the loss ------------------------------------------------------------------------------------

class DirectLoss:
    """``loss_fn(model, guide, *args)`` with the signature of ``differentiable_loss``.

    Called with ``vae.model``/``vae.guide`` (and only ``latent_scale`` handlers
    active) it returns the direct loss; otherwise it defers to
    ``elbo.differentiable_loss``.  ``fast_parts`` uses the registries'
    object-free distributions when all three parts have one.
    """

    def __init__(self, elbo: ELBO, vae: VAE, fast_parts: bool = True) -> None:
        reason = unsupported_reason(elbo, vae)
        if reason is not None:
            raise ValueError(f"the direct loss does not apply: {reason}")
        self.elbo = elbo
        self.vae = vae
        self.kind = estimator_kind(elbo)
        self.num_particles = int(elbo.num_particles)
        self.alpha = float(getattr(elbo, "alpha", 0.0))
        self._parts = fast_parts_of(vae) if fast_parts else None
        self.fast_parts = self._parts is not None

    def __repr__(self) -> str:
        parts = "fast parts" if self.fast_parts else "distribution objects"
        return f"DirectLoss({type(self.elbo).__name__}, K={self.num_particles}, {parts})"

    def __call__(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        scale = direct_latent_scale()
        if (scale is None or kwargs or not 1 <= len(args) <= 2 or getattr(model, "__self__", None) is not self.vae
                or bound_vae(model, guide) is None):
            return self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        loss = self.loss(*args, scale=scale)
        if loss is None:  # a guide draw without rsample: only Pyro's estimator handles it
            return self.elbo.differentiable_loss(model, guide, *args)
        return loss

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor | None:
        """The estimator's loss (sum over the batch) at latent scale ``scale`` (default: the
        active one); ``None`` if the guide cannot rsample."""
        scale = current_latent_scale() if scale is None else scale
        if self.fast_parts:
            return self._loss(x, y, scale)
        with pyro.validation_enabled(False):
            return self._loss(x, y, scale)

    def _loss(self, x: torch.Tensor, y: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        one = self.num_particles == 1
        # One particle of a Monte Carlo ELBO: the loss is minus a sum over the batch of each
        # point's terms, so each term is summed over the batch as it is computed.
        totals = one and self.fast_parts and self.kind in ("trace", "meanfield")
        # One particle: no particle plate, as in Pyro; the bounds then see a particle dim of 1.
        draw = direct_draw(self.vae, x, y, self.num_particles, self._parts, particle_dim=False, total=totals)
        if draw is None:
            return None
        if self.kind == "meanfield":
            kl = _analytic_kl(draw.q, draw.p)
            if kl is not None:
                if totals:  # (D16) with K = 1, summed over the batch
                    return -sgvb_estimator(draw.log_px.unsqueeze(0), kl.sum(), beta=scale)
                log_px = draw.log_px.unsqueeze(0) if one else draw.log_px
                return -sgvb_estimator(log_px, kl, beta=scale).sum()
        if totals:  # (D15) with K = 1, summed over the batch
            log_w = _scaled(draw.p.log_prob(draw.z).sum(), scale) + draw.log_px - _scaled(draw.log_q().sum(), scale)
            return -elbo_bound(log_w.unsqueeze(0))
        log_w = _scaled(draw.p.log_prob(draw.z), scale) + draw.log_px - _scaled(draw.log_q(), scale)
        if one:
            log_w = log_w.unsqueeze(0)
        if self.kind in ("trace", "meanfield"):
            return -elbo_bound(log_w).sum()
        return -renyi_bound(log_w, self.alpha).sum()


# -- importance weights ----------------------------------------------------------------------

def direct_log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1,
                       scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per-point, per-particle ``(log w, log p(x|z), log p(z) - log q(z|x))``, each ``(K, B)``,
    from the fast parts, with the latent terms scaled by ``scale``; ``None`` when ``vae`` has
    no fast parts.

    The draws and floats of tracing the guide under a particle plate and replaying
    the model (:func:`pyro_vae.infer.weights.log_weights`), without the traces:
    ``log w`` adds the terms in the order Pyro adds the sites (``z``, ``x``, minus
    the guide's ``z``).
    """
    parts = fast_parts_of(vae)
    if bound_vae(vae.model, vae.guide) is None or parts is None:
        return None
    draw = direct_draw(vae, x, y, num_particles, parts, particle_dim=True)
    log_pz = _scaled(draw.p.log_prob(draw.z), scale)
    log_qz = _scaled(draw.log_q(), scale)
    return log_pz + draw.log_px - log_qz, draw.log_px, log_pz - log_qz
