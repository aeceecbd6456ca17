"""Lean estimators for any model/guide pair, and the training loss chosen from them.

A Pyro ``*_ELBO.differentiable_loss`` rebuilds a full ``Trace`` per program per
step, validates every site and distribution argument, computes score-function
parts, checks for NaN and (``Trace_ELBO``, ``TraceMeanField_ELBO``) calls
``.item()`` -- a host sync on a GPU.  For programs whose guide sites are all
reparameterized none of that changes the loss.  The estimators here sit
beside the Pyro classes they speed up, as ``JitTrace_ELBO`` sits beside
``Trace_ELBO``:

================================  ==============================  =====================================
lean estimator                    Pyro estimator                  loss (sum over the data)
================================  ==============================  =====================================
:class:`FastTrace_ELBO`           ``Trace_ELBO``                  ``-elbo_bound(log w)``
:class:`FastTraceMeanField_ELBO`  ``TraceMeanField_ELBO``         ``-canonical_elbo(log p(x|z), KL)``
:class:`FastRenyiELBO`            ``DifferentiableRenyiELBO``     ``-sum renyi_bound(log w, alpha)``
================================  ==============================  =====================================

Each runs the guide and the model replayed on its draws under a lean site
recorder (no ``Trace`` graph, no copies), with validation off, the vectorized
particle plate exactly where Pyro puts it (so the same RNG state gives the same
draws), each log-density computed once, the log-weights from
:mod:`pyro_vae.infer.weights` and the bounds from :mod:`pyro_vae.infer.bounds`.
A program it cannot read raises :class:`UnsupportedProgram`: a guide site
without ``rsample``, enumeration, a subsampled plate, a model latent site the
guide does not sample, an observed site in the guide.

:func:`make_loss_fn` is the trainer's one entry point: the direct loss of the
built-in VAE (:mod:`pyro_vae.infer.direct`) when it applies, else the lean
estimator, each checked once against the Pyro estimator, else the Pyro
estimator itself.  An estimator with a gradient of its own
(:mod:`pyro_vae.infer.estimators`) has no Pyro twin: it is returned itself,
its value checked once against the same bound of Pyro's traces.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pyro
import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.infer.bounds import canonical_elbo, elbo_bound, renyi_bound
from pyro_vae.infer.direct import (
    DirectLoss,
    bound_vae,
    has_fast_parts,
    unsupported_reason,
)
from pyro_vae.infer.objectives import DifferentiableRenyiELBO
from pyro_vae.infer.params import program_parameters
from pyro_vae.infer.rng import get_rng_state, set_rng_state
from pyro_vae.infer.scale import latent_scale
from pyro_vae.infer.weights import site_log_prob, weights_from_sites

LossFn = Callable[..., torch.Tensor]

#: Probe batch size of the one-off equivalence check.
PROBE_SIZE = 16
#: Latent scales at which the equivalence check compares the losses.
PROBE_LATENT_SCALES = (1.0, 0.3)


class UnsupportedProgram(NotImplementedError):
    """The lean estimator cannot read this program; use the Pyro estimator."""


class LossMismatch(ValueError):
    """A faster loss disagrees with the Pyro estimator it replaces."""


# -- lean traces ---------------------------------------------------------------------------------

class _SiteRecorder(Messenger):
    """Keeps each random sample site's message by name (no ``Trace`` graph, no copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[str, dict] = {}

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        if msg["name"] in self.sites:
            raise UnsupportedProgram(f"site {msg['name']!r} is sampled twice")
        self.sites[msg["name"]] = msg


class _Replay(Messenger):
    """``poutine.replay`` on recorded guide sites: latent model sites take the guide's value."""

    def __init__(self, guide_sites: dict[str, dict]) -> None:
        super().__init__()
        self.guide_sites = guide_sites

    def _pyro_sample(self, msg: dict) -> None:
        site = self.guide_sites.get(msg["name"])
        if site is None or msg["is_observed"]:
            return
        msg["done"] = True
        msg["value"] = site["value"]
        msg["infer"] = site["infer"]


def _check_readable(model_sites: dict[str, dict], guide_sites: dict[str, dict]) -> None:
    """Raise :class:`UnsupportedProgram` for what the lean estimators do not reproduce."""
    for name, site in guide_sites.items():
        if site["is_observed"]:
            raise UnsupportedProgram(f"guide site {name!r} is observed")
        if not getattr(site["fn"], "has_rsample", False):
            raise UnsupportedProgram(f"guide site {name!r} is not reparameterized")
    for name, site in (*model_sites.items(), *guide_sites.items()):
        if site["infer"].get("enumerate"):
            raise UnsupportedProgram(f"site {name!r} is enumerated")
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise UnsupportedProgram(f"plate {frame.name!r} is subsampled")
        if not site["is_observed"] and name not in guide_sites:
            raise UnsupportedProgram(f"model site {name!r} is neither observed nor in the guide")


class _LeanEstimator:
    """What the lean estimators share: the lean pair of runs, and ``loss``/``loss_and_grads``
    through ``differentiable_loss``.  Mixed into a subclass of a Pyro ``ELBO``."""

    #: The Pyro class whose loss this one reproduces.
    pyro_class: type[ELBO]

    @classmethod
    def from_elbo(cls, elbo: ELBO) -> "_LeanEstimator":
        """The lean estimator with every setting of ``elbo`` (an instance of :attr:`pyro_class`)."""
        fast = cls.__new__(cls)
        fast.__dict__.update(elbo.__dict__)
        return fast

    def pyro_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """The Pyro estimator's ``differentiable_loss``, with these settings."""
        return self.pyro_class.differentiable_loss(self, model, guide, *args, **kwargs)

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def _lean_pairs(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> list[tuple[dict, dict]]:
        """``(model_sites, guide_sites)`` per particle run, as ``ELBO._get_traces`` yields traces
        (one vectorized run, or ``num_particles`` runs), with validation off."""
        with pyro.validation_enabled(False):
            if not self.vectorize_particles:
                return [self._lean_pair(model, guide, args, kwargs) for _ in range(self.num_particles)]
            if self.max_plate_nesting == math.inf:
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            return [self._lean_pair(self._vectorized_num_particles(model), self._vectorized_num_particles(guide),
                                    args, kwargs)]

    @staticmethod
    def _lean_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict):
        guide_recorder = _SiteRecorder()
        with guide_recorder:
            guide(*args, **kwargs)
        model_recorder = _SiteRecorder()
        with model_recorder, _Replay(guide_recorder.sites):
            model(*args, **kwargs)
        _check_readable(model_recorder.sites, guide_recorder.sites)
        return model_recorder.sites, guide_recorder.sites

    def _particle_weights(self, model, guide, args, kwargs, reduce_for) -> torch.Tensor:
        """Per-particle log-weights ``(K, ...)``: vectorized in one run, or stacked runs."""
        weights = []
        for model_sites, guide_sites in self._lean_pairs(model, guide, args, kwargs):
            reduce = reduce_for(model_sites)
            weights.append(weights_from_sites(model_sites, guide_sites, reduce, parts=False).log_weight)
        if self.vectorize_particles and self.num_particles > 1:
            return weights[0]
        return torch.stack(weights)


class FastTrace_ELBO(_LeanEstimator, Trace_ELBO):
    """``Trace_ELBO`` for reparameterized guides, lean: ``-(1/K) sum_k log w_k`` summed over the
    data, the Monte Carlo ELBO (:func:`~pyro_vae.infer.bounds.elbo_bound`)."""

    pyro_class = Trace_ELBO

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        vectorized = self.vectorize_particles and self.num_particles > 1
        dim = -self.max_plate_nesting if vectorized else None

        def reduce_for(model_sites):
            if dim is None:
                return lambda lp: lp.sum()
            return lambda lp: lp.sum([d for d in range(-lp.dim(), 0) if d != dim])

        return -elbo_bound(self._particle_weights(model, guide, args, kwargs, reduce_for))


class FastRenyiELBO(_LeanEstimator, DifferentiableRenyiELBO):
    """``DifferentiableRenyiELBO`` (``RenyiELBO``, IWAE at ``alpha = 0``), lean:
    ``-sum renyi_bound(log w, alpha)`` with each site summed over the plates not
    shared by all sites, as Pyro sums them."""

    pyro_class = DifferentiableRenyiELBO

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        def reduce_for(model_sites):
            sum_dims = get_dependent_plate_dims(model_sites.values())
            return lambda lp: torch_sum(lp, sum_dims)

        return -renyi_bound(self._particle_weights(model, guide, args, kwargs, reduce_for), self.alpha).sum()


class FastTraceMeanField_ELBO(_LeanEstimator, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO``, lean: ``-canonical_elbo(sum log p(x | z), sum KL(q || p))`` with the
    closed-form KL per latent site where one is registered (scaled and masked by the
    guide site, so a latent scale is the beta of Higgins et al. 2017), else that
    site's Monte Carlo term ``log p - log q`` in the reconstruction part, as Pyro does."""

    pyro_class = TraceMeanField_ELBO

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        loss = 0.0
        for model_sites, guide_sites in self._lean_pairs(model, guide, args, kwargs):
            reconstruction = kl = 0.0
            for name, model_site in model_sites.items():
                if model_site["is_observed"]:
                    reconstruction = reconstruction + site_log_prob(model_site).sum()
                    continue
                guide_site = guide_sites[name]
                try:
                    kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
                except NotImplementedError:
                    reconstruction = (reconstruction + site_log_prob(model_site).sum()
                                      - site_log_prob(guide_site).sum())
                    continue
                kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
                kl = kl + (kl_qp.sum() if torch.is_tensor(kl_qp)
                           else kl_qp * torch.Size(guide_site["fn"].batch_shape).numel())
            for name, guide_site in guide_sites.items():
                if name not in model_sites:  # auxiliary guide sites
                    reconstruction = reconstruction - site_log_prob(guide_site).sum()
            loss = loss - canonical_elbo(reconstruction, kl) / self.num_particles
        return loss


#: Exact Pyro estimator class -> its lean estimator.
FAST_ESTIMATORS: dict[type, type[_LeanEstimator]] = {
    Trace_ELBO: FastTrace_ELBO,
    TraceMeanField_ELBO: FastTraceMeanField_ELBO,
    DifferentiableRenyiELBO: FastRenyiELBO,
}


def fast_estimator(elbo: ELBO) -> _LeanEstimator | None:
    """The lean estimator of ``elbo`` (``elbo`` itself if it is one), else ``None``.  Exact
    types only: a subclass (``JitTrace_ELBO``, a user's) may change the estimator."""
    if isinstance(elbo, _LeanEstimator):
        return elbo
    cls = FAST_ESTIMATORS.get(type(elbo))
    return None if cls is None else cls.from_elbo(elbo)


def reference_loss(elbo: ELBO) -> LossFn:
    """The Pyro estimator's ``differentiable_loss`` for ``elbo`` (its Pyro class's, for a lean one)."""
    return elbo.pyro_loss if isinstance(elbo, _LeanEstimator) else elbo.differentiable_loss


# -- the one-off check ---------------------------------------------------------------------------

def _loss_and_grads(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
    return loss.detach(), grads


def _close_in_norm(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> bool:
    """``||got - expected|| <= rtol ||expected|| + atol``: robust to entries near zero."""
    return float((got - expected).norm()) <= rtol * float(expected.norm()) + atol


def check_loss_fn(loss_fn: LossFn, elbo: ELBO, model: Callable, guide: Callable, args: tuple,
                  latent_scales: tuple[float, ...] = PROBE_LATENT_SCALES, rtol: float = 1e-4,
                  atol: float = 1e-4, gradients: bool = True, read_first: bool = False) -> None:
    """Raise :class:`LossMismatch` unless ``loss_fn(model, guide, *args)`` gives the Pyro
    estimator's loss and gradients from the same RNG state, at each latent scale
    (:class:`UnsupportedProgram` propagates).  With ``gradients=False`` only the losses are
    compared (both are still differentiated, so a backward pass that fails shows here).
    With ``read_first``, ``loss_fn`` first runs once without gradients, so that a program it
    cannot read raises :class:`UnsupportedProgram`, naming the site, before the Pyro estimator
    fails on it in its own words.

    Leaves no trace: the random state and the owning module's buffers are put back,
    and gradients come from ``autograd.grad``, never accumulated in ``.grad``.
    """
    reference = reference_loss(elbo)
    params = [p for p in program_parameters(model, guide, *args).values() if p.requires_grad]
    owner = getattr(model, "__self__", None)
    buffers = {name: b.clone() for name, b in owner.named_buffers()} if isinstance(owner, nn.Module) else {}
    start = get_rng_state()
    name = getattr(loss_fn, "__qualname__", None) or repr(loss_fn)
    try:
        if read_first:
            with torch.no_grad():
                loss_fn(model, guide, *args)
        for scale in latent_scales:
            set_rng_state(start)
            with latent_scale(scale=scale):
                expected, expected_grads = _loss_and_grads(lambda: reference(model, guide, *args), params)
            set_rng_state(start)
            with latent_scale(scale=scale):
                got, got_grads = _loss_and_grads(lambda: loss_fn(model, guide, *args), params)
            if not torch.allclose(got, expected, rtol=rtol, atol=atol):
                raise LossMismatch(f"{name} gives {float(got):.6g} but {type(elbo).__name__} gives "
                                   f"{float(expected):.6g} at latent scale {scale}")
            for p, g, e in zip(params, got_grads, expected_grads) if gradients else ():
                if (g is None) != (e is None) or (g is not None and not _close_in_norm(g, e, rtol, atol)):
                    raise LossMismatch(f"{name}: the gradient of a parameter of shape {tuple(p.shape)} "
                                       f"differs from {type(elbo).__name__}'s at latent scale {scale}")
    finally:
        set_rng_state(start)
        if buffers:
            with torch.no_grad():
                for buffer_name, b in owner.named_buffers():
                    b.copy_(buffers[buffer_name])


# -- the entry point -----------------------------------------------------------------------------

def _probe(args: tuple | None) -> tuple | None:
    if args is None:
        return None
    return tuple(a[:PROBE_SIZE] if torch.is_tensor(a) and a.dim() > 0 else a for a in args)


def _candidates(elbo: ELBO, model: Callable, guide: Callable) -> tuple[list[tuple[str, LossFn]], list[str]]:
    """The faster losses that apply, fastest first, and why the others do not."""
    candidates, reasons = [], []
    vae = bound_vae(model, guide)
    if vae is not None:
        reason = unsupported_reason(elbo, vae)
        if reason is None:
            direct = DirectLoss(elbo, vae, fast_parts=True)
            candidates.append((repr(direct), direct))
            if has_fast_parts(vae):
                objects = DirectLoss(elbo, vae, fast_parts=False)
                candidates.append((repr(objects), objects))
        else:
            reasons.append(f"the direct loss does not apply ({reason})")
    fast = fast_estimator(elbo)
    if fast is None:
        reasons.append(f"no lean form of {type(elbo).__name__}")
    else:
        if fast.vectorize_particles and fast.max_plate_nesting == math.inf:
            reasons.append("max_plate_nesting is not set")
        else:
            candidates.append((type(fast).__name__, fast.differentiable_loss))
    return candidates, reasons


def make_loss_fn(elbo: ELBO, model: Callable, guide: Callable, probe_args: tuple | None = None) -> LossFn:
    """The training loss ``loss_fn(model, guide, *args)`` (sum over the batch, like
    ``differentiable_loss``) for ``elbo`` on this program.

    An estimator with a gradient of its own
    (:class:`~pyro_vae.infer.estimators.WeightedEstimator`: ``stl``, ``iwae-dreg``,
    ``miwae``, ``ciwae``, ``piwae``) is its own reference: its ``differentiable_loss`` is
    returned, after one check on the probe that its value equals the same bound of Pyro's
    traces (and its gradients too where they are the bound's own); a program it cannot read
    is a ``ValueError`` naming the site and the reason.  For Pyro's estimators it tries, in
    order: (a) :class:`~pyro_vae.infer.direct.DirectLoss` when ``model``/``guide``
    are a built-in VAE's own methods (object-free parts first, then the parts'
    distributions); (b) the lean estimator of ``elbo`` (:data:`FAST_ESTIMATORS`);
    each is checked once on the first :data:`PROBE_SIZE` points of ``probe_args``
    against ``elbo.differentiable_loss`` (:func:`check_loss_fn`: loss and gradients at
    latent scales 1 and 0.3) and the first that passes is returned.  A candidate
    that fails warns, naming why.  (c) Otherwise ``elbo.differentiable_loss``, with a
    ``UserWarning`` giving the reasons.  Without ``probe_args`` the first candidate
    is returned unchecked.  The check leaves no trace (random state, buffers,
    ``.grad``).
    """
    from pyro_vae.infer.estimators import WeightedEstimator  # it builds on this module

    probe = _probe(probe_args)
    if isinstance(elbo, WeightedEstimator):
        if probe is not None:
            try:
                check_loss_fn(elbo.differentiable_loss, elbo, model, guide, probe, gradients=elbo.bound_gradient,
                              read_first=True)
            except UnsupportedProgram as error:
                raise ValueError(f"{type(elbo).__name__} cannot train this program: {error}") from None
            except LossMismatch as error:
                raise LossMismatch(f"{type(elbo).__name__} reads this program differently from Pyro's traces of it: "
                                   f"{error}") from None
        return elbo.differentiable_loss
    candidates, reasons = _candidates(elbo, model, guide)
    if probe is None and candidates:
        return candidates[0][1]
    failures = []
    for _, loss_fn in candidates:
        try:
            check_loss_fn(loss_fn, elbo, model, guide, probe)
        except (LossMismatch, UnsupportedProgram) as error:
            failures.append(str(error))
            continue
        if failures:
            warnings.warn(f"{'; '.join(failures)}: using {_name(loss_fn)} instead", stacklevel=2)
        return loss_fn
    warnings.warn(f"{'; '.join(reasons + failures)}: training with {type(elbo).__name__}.differentiable_loss "
                  "(slower)", stacklevel=2)
    return elbo.differentiable_loss


def _name(loss_fn: LossFn) -> str:
    owner = getattr(loss_fn, "__self__", None)
    return type(owner).__name__ if owner is not None else repr(loss_fn)


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` with the fused kernel where the parameters' device has one.

    One fused update of all parameters replaces a Python loop of about ten
    kernels per parameter (docs/performance.md).  Same update rule, so the same
    training up to rounding.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


__all__ = [
    "FAST_ESTIMATORS", "FastRenyiELBO", "FastTraceMeanField_ELBO", "FastTrace_ELBO", "LossFn", "LossMismatch",
    "PROBE_SIZE", "UnsupportedProgram", "check_loss_fn", "fast_estimator", "make_loss_fn", "make_optimizer",
    "program_parameters", "reference_loss",
]
