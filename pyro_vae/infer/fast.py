"""A faster training step that computes exactly what the Pyro estimator computes (issue 5).

A Pyro ``*_ELBO.differentiable_loss`` re-discovers the program's structure on
every step: it traces the guide, replays the model, walks the messenger stack,
registers every parameter with ``pyro.module``, validates sites and
distribution arguments, and (``Trace_ELBO``, ``TraceMeanField_ELBO``) calls
``.item()`` -- a host sync on a GPU.  For the library's own
:class:`~pyro_vae.models.vae.VAE` that structure is fixed: one latent site ``z`` from
``vae.prior(B, c)`` / ``vae.encoder(x, c)``, one observed site ``x`` from
``vae.decoder(z, c)``, one data plate, the latent site scaled in both
programs by the active :func:`~pyro_vae.infer.scale.latent_scale`.  :class:`DirectLoss` computes the estimator
straight from the parts:

* the guide draw is ``q.expand((K, B)).rsample()`` for ``K`` vectorized
  particles (``q.rsample()`` for one), what Pyro's particle plate samples, so
  the same RNG state gives the same ``z``;
* ``trace``:     ``-(1/K) sum [s log p(z) + log p(x|z) - s log q(z|x)]``, Eq. (2);
* ``meanfield``: ``s sum KL(q || p) - (1/K) sum log p(x|z)`` with the closed form
  (Eq. 6 for the Gaussian pair) where ``kl_divergence`` is registered, else the
  Monte Carlo term of ``trace``, as ``TraceMeanField_ELBO`` falls back;
* ``renyi``/``iwae``: ``-1/(1-a) sum_n [logsumexp_k((1-a) log w_nk) - log K]`` with
  ``log w = s log p(z) + log p(x|z) - s log q(z|x)``, Sec. 1.10 (Li & Turner 2016);

with ``s = current_latent_scale()`` multiplying the latent site's log-densities as
``poutine.scale`` does, and the terms added in the order Pyro adds them, so the
floats agree too.  It never calls ``.item()`` and skips per-step argument
validation (the one-off check below runs the validated Pyro program).

For the built-in parts (:data:`FAST_PRIORS`, :data:`FAST_GUIDES`,
:data:`FAST_DECODERS`) it also skips building ``torch.distributions`` objects:
:class:`DiagonalNormal`, :class:`StandardNormal` and :class:`BernoulliLogits`
evaluate the expressions of ``Normal(loc, scale).to_event(1)``, ``N(0, I)`` and
``Bernoulli(logits=...).to_event(1)`` -- the same floats, to the bit -- with
fewer small tensor ops and none of the distribution classes' per-call Python;
at batch 128 on CPU that was most of what was left of the gap to hand-written
PyTorch (docs/performance.md).  :func:`direct_log_weights` gives importance
weights the same way, for K = 5000 evaluation.

The model/guide pair stays the single source of truth: :func:`make_loss_fn`
uses the direct loss only for ``VAE`` itself (not a subclass that overrides
``model`` or ``guide``), for the estimators of :func:`~pyro_vae.infer.objectives.make_elbo`,
and only after :func:`check_direct_loss` has shown on a probe batch that it
gives the Pyro estimator's loss *and* gradients from the same draws; otherwise
it warns and returns the Pyro estimator's ``differentiable_loss``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.distributions.kl import kl_divergence
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.infer.bounds import renyi_bound
from pyro_vae.infer.objectives import DifferentiableRenyiELBO
from pyro_vae.infer.scale import current_latent_scale, latent_scale
from pyro_vae.models.decoders import BernoulliDecoder, GaussianDecoder
from pyro_vae.models.guides import DiagonalGaussianEncoder
from pyro_vae.models.priors import StandardNormalPrior
from pyro_vae.models.vae import VAE

LossFn = Callable[..., torch.Tensor]

#: Probe batch size for the one-off equivalence check.
PROBE_SIZE = 16
#: Latent scales at which the equivalence check compares the two losses.
PROBE_KL_SCALES = (1.0, 0.3)
#: ``torch.distributions.Normal.log_prob``'s constant, computed the way it computes it.
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


class DirectLossMismatch(ValueError):
    """The direct loss disagrees with the Pyro estimator it replaces."""


# -- distributions without the objects ---------------------------------------------------------

class DiagonalNormal:
    """``Normal(loc, scale).to_event(1)``, optionally expanded to ``particles`` draws per point.

    ``rsample`` draws ``loc + eps * scale`` with ``eps = empty(shape).normal_()``
    (``Normal.rsample``'s draw, so the same RNG state gives the same ``z``), and
    ``log_prob`` is ``Normal.log_prob``'s expression summed over the last
    dimension, so values agree to the bit.
    """

    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, particles: int = 1) -> None:
        self.loc, self.scale, self.particles = loc, scale, particles

    def expand(self, batch_shape: tuple[int, int]) -> "DiagonalNormal":
        """The particle plate's ``(K, B)`` expansion: only the particle count changes."""
        return DiagonalNormal(self.loc, self.scale, batch_shape[0])

    def rsample(self) -> torch.Tensor:
        shape = self.loc.shape if self.particles == 1 else (self.particles, *self.loc.shape)
        eps = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device).normal_()
        return self.loc + eps * self.scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        var = self.scale**2
        # Normal.log_prob's -(d ** 2) / (2 var), with the sign moved to the (often smaller)
        # denominator: IEEE negation is exact, so the value is the same to the bit.
        return ((value - self.loc) ** 2 / (-2 * var) - self.scale.log() - _LOG_SQRT_2PI).sum(-1)


class BernoulliLogits:
    """``Bernoulli(logits=logits).to_event(1)``: ``log_prob`` is ``-BCEWithLogits`` summed
    over the last dimension, negated after the sum (exact, and one full-size op fewer)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.logits
        if value.shape != logits.shape:  # particles on the left of the data
            logits, value = torch.broadcast_tensors(logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class StandardNormal:
    """N(0, I) over the last dimension: ``Normal(0, 1).to_event(1).log_prob`` with ``loc = 0`` and
    ``scale = 1`` folded in.  Exact: ``z - 0``, ``/ (2 * 1)`` and ``- log 1`` change no bit, and
    folding them saves the prior's share of small ops (a third of the gap to hand-written on
    the trace estimator at batch 128, docs/performance.md)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return (value**2 / -2 - _LOG_SQRT_2PI).sum(-1)


def diagonal_normal_kl(q: DiagonalNormal, p: DiagonalNormal | StandardNormal) -> torch.Tensor:
    """KL(q || p) per point: torch's Normal-Normal closed form summed over the last dimension;
    Eq. (6) when ``p`` is :class:`StandardNormal` (the same floats: dividing by 1 is exact)."""
    if isinstance(p, StandardNormal):
        var_ratio, t1 = q.scale.pow(2), q.loc.pow(2)
    else:
        var_ratio = (q.scale / p.scale).pow(2)
        t1 = ((q.loc - p.loc) / p.scale).pow(2)
    return (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum(-1)


#: Part class -> its distribution without the objects.  Exact classes only (a subclass may
#: change ``forward``); every entry must reproduce that class's ``forward`` term for term,
#: and :func:`check_direct_loss` verifies it against Pyro before training uses it.
FAST_PRIORS: dict[type, Callable[[Any, int, torch.Tensor | None], Any]] = {
    # N(0, I) by definition: its zero/one buffers only carry the device (and the check below
    # compares with Pyro, which reads them).
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


# -- which estimators --------------------------------------------------------------------------

def estimator_kind(elbo: ELBO) -> str | None:
    """``trace``, ``meanfield`` or ``renyi`` for the estimators the direct loss reproduces, else ``None``.

    Exact types only: Pyro's ``JitTrace_ELBO`` and friends subclass these, and
    a user's subclass may change the estimator.
    """
    return {Trace_ELBO: "trace", TraceMeanField_ELBO: "meanfield", DifferentiableRenyiELBO: "renyi",
            RenyiELBO: "renyi"}.get(type(elbo))


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
    data_plates = elbo.max_plate_nesting - (1 if elbo.num_particles > 1 else 0)
    if data_plates != 1:
        return f"max_plate_nesting={elbo.max_plate_nesting} (the direct loss assumes the one data plate)"
    return None


# -- the loss ------------------------------------------------------------------------------------

class DirectLoss:
    """``loss_fn(model, guide, x, y)`` with the signature of ``differentiable_loss``.

    Called with ``vae.model``/``vae.guide`` it returns the direct loss; with any
    other program it defers to ``elbo.differentiable_loss``.  ``fast_parts``
    uses the registries' object-free distributions when all three parts have
    one.  Build it with :func:`make_loss_fn`, which checks it first.
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
        self.fast_parts = fast_parts and has_fast_parts(vae)
        if self.fast_parts:
            self._fast = (FAST_GUIDES[type(vae.encoder)], FAST_PRIORS[type(vae.prior)],
                          FAST_DECODERS[type(vae.decoder)])

    def __repr__(self) -> str:
        parts = "fast parts" if self.fast_parts else "distribution objects"
        return f"DirectLoss({type(self.elbo).__name__}, K={self.num_particles}, {parts})"

    def __call__(self, model: Callable, guide: Callable, x: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        if not (_is_bound(model, self.vae, VAE.model) and _is_bound(guide, self.vae, VAE.guide)):
            return self.elbo.differentiable_loss(model, guide, x, y)
        if self.fast_parts:
            loss = self.loss(x, y)
        else:
            with pyro.validation_enabled(False):
                loss = self.loss(x, y)
        if loss is None:  # a guide draw without rsample: only Pyro's estimator handles it
            return self.elbo.differentiable_loss(model, guide, x, y)
        return loss

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor | None:
        """The estimator's loss (sum over the batch); ``None`` if the guide cannot rsample."""
        vae, k, scale = self.vae, self.num_particles, current_latent_scale()
        batch = x.shape[0]
        c = vae.condition(y)
        # Same order of part calls and draws as the guide, then the replayed model.
        if self.fast_parts:
            guide_fn, prior_fn, decoder_fn = self._fast
            q = guide_fn(vae.encoder, x, c)
        else:
            q = vae.encoder(x, c)
            if not q.has_rsample:
                return None
        q_particles = q.expand((k, batch)) if k > 1 else q
        z = q_particles.rsample()
        if self.fast_parts:
            p = prior_fn(vae.prior, batch, c)
            log_px = decoder_fn(vae.decoder, z, c).log_prob(x)
        else:
            p = vae.prior(batch, c)
            log_px = vae.decoder(z, c).log_prob(x)
        # Site log-densities are added in the order Pyro's estimators add them
        # (model sites z then x, then the guide's z), so float rounding agrees too.
        if self.kind == "meanfield":
            kl = _analytic_kl(q, p)
            if kl is not None:
                return _scaled(kl, scale).sum() - (log_px.sum() if k == 1 else log_px.sum() / k)
        log_pz = _scaled(p.log_prob(z), scale)
        log_qz = _scaled(q_particles.log_prob(z), scale)
        if self.kind in ("trace", "meanfield"):
            loss = log_qz.sum() - (log_pz.sum() + log_px.sum())  # = -(elbo), exactly
            return loss if k == 1 else loss / k
        log_w = log_pz + log_px - log_qz
        if k == 1:
            log_w = log_w.unsqueeze(0)
        return -renyi_bound(log_w, self.alpha).sum()


def _analytic_kl(q, p) -> torch.Tensor | None:
    """KL(q || p) per point where a closed form exists (as ``TraceMeanField_ELBO`` finds it), else None."""
    if isinstance(q, DiagonalNormal) and isinstance(p, (DiagonalNormal, StandardNormal)):
        return diagonal_normal_kl(q, p)
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _scaled(log_density: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``poutine.scale`` does to a site's log-density."""
    return log_density if scale == 1.0 else log_density * scale


def _is_bound(method: Callable, owner: object, function: Callable) -> bool:
    return getattr(method, "__self__", None) is owner and getattr(method, "__func__", None) is function


# -- importance weights ----------------------------------------------------------------------

def direct_log_weights(vae: VAE, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per-point, per-particle ``(log w, log p(x|z), log p(z) - log q(z|x))``, each ``(K, B)``, of the
    true model (no latent scale), from the fast parts; ``None`` when ``vae`` has none.

    The same draws and floats as tracing the guide under a particle plate and replaying the
    model (``pyro_vae.evaluation.importance``), without the traces and without the distribution objects:
    the prior's log-density of N(0, I) and the likelihood's negation after the pixel sum save
    full-size tensor ops, which is what K = 5000 evaluation spends its time on.
    """
    if type(vae).model is not VAE.model or type(vae).guide is not VAE.guide or not has_fast_parts(vae):
        return None
    c = vae.condition(y)
    q = FAST_GUIDES[type(vae.encoder)](vae.encoder, x, c).expand((num_particles, x.shape[0]))
    z = q.rsample()
    if num_particles == 1:
        z = z.unsqueeze(0)
    recon = FAST_DECODERS[type(vae.decoder)](vae.decoder, z, c).log_prob(x)
    latent = FAST_PRIORS[type(vae.prior)](vae.prior, x.shape[0], c).log_prob(z) - q.log_prob(z)
    return recon + latent, recon, latent


# -- the one-off check ------------------------------------------------------------------------

def _rng_states(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _loss_and_grads(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
    return loss.detach(), grads


def _close_in_norm(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> bool:
    """``||got - expected|| <= rtol ||expected|| + atol``: robust to entries near zero."""
    return float((got - expected).norm()) <= rtol * float(expected.norm()) + atol


def check_direct_loss(direct: DirectLoss, x: torch.Tensor, y: torch.Tensor | None = None,
                      kl_scales: tuple[float, ...] = PROBE_KL_SCALES, rtol: float = 1e-4,
                      atol: float = 1e-4) -> None:
    """Raise :class:`DirectLossMismatch` unless ``direct`` gives the Pyro estimator's loss
    and gradients on ``(x, y)`` from the same RNG state, at each of ``kl_scales``.

    Leaves no trace: the global RNG state and the module's
    buffers are restored, and gradients come from ``autograd.grad`` rather than
    being accumulated, so training continues as if the check never ran.
    """
    vae, elbo = direct.vae, direct.elbo
    params = [p for p in vae.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in vae.named_buffers()}
    start = _rng_states(x.device)
    try:
        for scale in kl_scales:
            _set_rng_states(start, x.device)
            with latent_scale(scale=scale):
                expected, expected_grads = _loss_and_grads(
                    lambda: elbo.differentiable_loss(vae.model, vae.guide, x, y), params)
            _set_rng_states(start, x.device)
            with latent_scale(scale=scale):
                got, got_grads = _loss_and_grads(lambda: direct(vae.model, vae.guide, x, y), params)
            if not torch.allclose(got, expected, rtol=rtol, atol=atol):
                raise DirectLossMismatch(f"{direct!r} gives {float(got):.6g} but {type(elbo).__name__} gives "
                                         f"{float(expected):.6g} at kl_scale={scale}")
            for p, g, e in zip(params, got_grads, expected_grads):
                if (g is None) != (e is None) or (g is not None and not _close_in_norm(g, e, rtol, atol)):
                    raise DirectLossMismatch(f"{direct!r}: the gradient of a parameter of shape "
                                             f"{tuple(p.shape)} differs from {type(elbo).__name__}'s "
                                             f"at kl_scale={scale}")
    finally:
        _set_rng_states(start, x.device)
        with torch.no_grad():
            for name, b in vae.named_buffers():
                b.copy_(buffers[name])


def make_loss_fn(elbo: ELBO, vae: VAE, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> LossFn:
    """Pick the training loss: a checked :class:`DirectLoss` when one applies, else
    ``elbo.differentiable_loss``.

    ``x``/``y`` (data; the first :data:`PROBE_SIZE` points are used) are the
    probe batch of :func:`check_direct_loss`; without them the direct loss is
    used unchecked.  The object-free fast parts are tried first, then the
    parts' own distributions; if both disagree with Pyro, it warns and returns
    Pyro's estimator.
    """
    if unsupported_reason(elbo, vae) is not None:
        return elbo.differentiable_loss
    candidates = [DirectLoss(elbo, vae, fast_parts=True)]
    if candidates[0].fast_parts:
        candidates.append(DirectLoss(elbo, vae, fast_parts=False))
    if x is None:
        return candidates[0]
    probe_y = None if y is None else y[:PROBE_SIZE]
    errors = []
    for direct in candidates:
        try:
            check_direct_loss(direct, x[:PROBE_SIZE], probe_y)
        except DirectLossMismatch as error:
            errors.append(str(error))
            continue
        if errors:  # a fast-part entry has drifted from its part's forward
            warnings.warn(f"{errors[0]}; using the parts' own distributions instead", stacklevel=2)
        return direct
    warnings.warn(f"{'; '.join(errors)}: training with the Pyro estimator instead (slower)", stacklevel=2)
    return elbo.differentiable_loss


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` with the fused kernel where the parameters' device has one.

    One fused update of all parameters replaces a Python loop of about ten
    kernels per parameter; on CPU it cut Adam's step several times
    (docs/performance.md).  Same update rule, so the same training up to rounding.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)
