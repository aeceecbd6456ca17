"""Build a model from part names: the registries behind ``--prior``, ``--guide`` and ``--decoder``.

Each registry maps a name to a builder taking the :class:`~pyro_vae.models.config.ModelConfig`,
the number of data features ``d``, the label size ``k`` (0 when unconditional)
and, for guides and decoders, the data's image shape (for ``network="conv"``);
prior builders get the already-built encoder instead (the VampPrior is a
mixture of the guide).  A new part is one builder function and one entry here.

A name with a colon, ``package.module:Name``, is a user's part: ``Name`` is
imported and called with the keyword arguments its signature accepts among
:data:`PART_KWARGS` (and ``config``), and the result is probed once on a small
batch (:func:`build_user_part`).  See ``docs/parts.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import re
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.distributions import Distribution

from pyro_vae.models.config import ModelConfig, check_pair
from pyro_vae.models.decoders import (
    BernoulliDecoder,
    ContinuousBernoulliDecoder,
    GaussianDecoder,
    PixelScaleGaussianDecoder,
)
from pyro_vae.models.discrete import (
    CategoricalLatentDecoder,
    RelaxedCategoricalEncoder,
    RelaxedCategoricalPrior,
    TemperatureSchedule,
)
from pyro_vae.models.flows import FlowPrior, IAFEncoder
from pyro_vae.models.guides import (
    DiagonalGaussianEncoder,
    FullCovarianceEncoder,
    LowRankGaussianEncoder,
)
from pyro_vae.models.priors import (
    LearnedNormalPrior,
    MixtureOfGaussiansPrior,
    StandardNormalPrior,
    VampPrior,
)
from pyro_vae.models.protocols import DecoderPart, EncoderPart, PriorPart
from pyro_vae.models.two_layer import TwoLayerVAE
from pyro_vae.models.vae import VAE

ImageShape = Sequence[int] | None
PriorBuilder = Callable[[ModelConfig, int, int, EncoderPart], PriorPart]
EncoderBuilder = Callable[[ModelConfig, int, int, ImageShape], EncoderPart]
DecoderBuilder = Callable[[ModelConfig, int, int, ImageShape], DecoderPart]


def _schedule(c: ModelConfig) -> TemperatureSchedule:
    return TemperatureSchedule(c.temperature, c.temperature_min, c.temperature_anneal)


def _net(c: ModelConfig, image_shape: ImageShape) -> dict[str, Any]:
    return {"network": c.network, "image_shape": image_shape}


PRIORS: dict[str, PriorBuilder] = {
    "normal": lambda c, d, k, enc: StandardNormalPrior(c.latent_dim),
    "learned-normal": lambda c, d, k, enc: LearnedNormalPrior(c.latent_dim),
    "mixture": lambda c, d, k, enc: MixtureOfGaussiansPrior(c.latent_dim, c.mixture_components),
    "vamp": lambda c, d, k, enc: VampPrior(enc, d, c.pseudo_inputs, condition_dim=k),
    "flow": lambda c, d, k, enc: FlowPrior(c.latent_dim, c.flow_steps, c.flow_hidden),
    "categorical": lambda c, d, k, enc: RelaxedCategoricalPrior(c.latent_dim, c.num_categories, _schedule(c),
                                                                c.straight_through),
}
GUIDES: dict[str, EncoderBuilder] = {
    "diagonal": lambda c, d, k, s=None: DiagonalGaussianEncoder(d, c.latent_dim, c.hidden, c.activation, k,
                                                                **_net(c, s)),
    "lowrank": lambda c, d, k, s=None: LowRankGaussianEncoder(d, c.latent_dim, c.guide_rank, c.hidden, c.activation,
                                                              k, **_net(c, s)),
    "full": lambda c, d, k, s=None: FullCovarianceEncoder(d, c.latent_dim, c.hidden, c.activation, k, **_net(c, s)),
    "iaf": lambda c, d, k, s=None: IAFEncoder(d, c.latent_dim, c.flow_steps, c.flow_hidden, c.hidden, c.activation,
                                              k, **_net(c, s)),
    "categorical": lambda c, d, k, s=None: RelaxedCategoricalEncoder(d, c.latent_dim, c.num_categories, c.hidden,
                                                                     c.activation, k, _schedule(c),
                                                                     c.straight_through, **_net(c, s)),
}
DECODERS: dict[str, DecoderBuilder] = {
    "bernoulli": lambda c, d, k, s=None: BernoulliDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                          **_net(c, s)),
    "continuous-bernoulli": lambda c, d, k, s=None: ContinuousBernoulliDecoder(c.latent_dim, d, c.hidden[::-1],
                                                                               c.activation, k, **_net(c, s)),
    "gaussian": lambda c, d, k, s=None: GaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                        sigma=c.sigma_x, **_net(c, s)),
    "gaussian-learned": lambda c, d, k, s=None: GaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                                sigma=c.sigma_x, learn_sigma=True, **_net(c, s)),
    "gaussian-pixel": lambda c, d, k, s=None: PixelScaleGaussianDecoder(c.latent_dim, d, c.hidden[::-1],
                                                                        c.activation, k, sigma=c.sigma_x,
                                                                        **_net(c, s)),
}

#: Parts whose latent is categorical (event shape ``(latent_dim, num_categories)``); they pair only
#: with each other, and the decoder then reads ``latent_dim * num_categories`` one-hot features.
DISCRETE = "categorical"

#: Keyword arguments offered to a user's part (plus ``config``, and ``encoder`` for priors).
PART_KWARGS = ("input_dim", "latent_dim", "hidden", "activation", "condition_dim", "image_shape")

#: Batch size of the probe that checks a user's part.
PROBE_BATCH = 3
#: Particles of the probe that checks a user's decoder broadcasts a leading particle dimension.
PROBE_PARTICLES = 2

_IDENTIFIERS = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_IMPORT_PATH = re.compile(rf"({_IDENTIFIERS}):({_IDENTIFIERS})")


class PartError(ValueError):
    """A part named by import path could not be imported, built, or does not behave as a part."""


def is_import_path(name: str) -> bool:
    """Whether a ``--prior``/``--guide``/``--decoder`` value names a user's part (``package.module:Name``)."""
    return ":" in name


# -- a user's part by import path --------------------------------------------------------------------

def import_part(value: str, option: str) -> Callable[..., Any]:
    """Import the callable named by ``value`` (``package.module:Name``; ``Name`` may be dotted,
    e.g. ``Class.from_sizes``) for the command-line option ``option`` (``prior``, ``guide``, ``decoder``)."""
    where = f"--{option} {value!r}"
    match = _IMPORT_PATH.fullmatch(value.strip())
    if match is None:
        raise PartError(f"{where} is not an import path: expected 'package.module:Name' (a module, a colon, "
                        f"and the name of a class or function in it that builds a {option})")
    module_name, attribute = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise PartError(f"{where}: cannot import module {module_name!r} ({error}); expected a module that is "
                        "installed or on the Python path (PYTHONPATH)") from error
    except Exception as error:
        raise PartError(f"{where}: importing module {module_name!r} failed with "
                        f"{type(error).__name__}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            modules = sorted(name for name, obj in vars(module).items()
                             if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module_name)
            hint = f" (its nn.Module classes: {', '.join(modules)})" if modules else ""
            raise PartError(f"{where}: module {module_name!r} has no attribute {attribute!r}{hint}; expected "
                            f"the name of a class or function that builds a {option}")
        target = getattr(target, part)
    if not callable(target):
        raise PartError(f"{where}: {attribute!r} is a {type(target).__name__}, not callable; expected a class "
                        f"or function that builds a {option}")
    return target


def accepted_kwargs(builder: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``builder``'s signature accepts (all of them for ``**kwargs``).

    Raises :class:`TypeError` naming the parameters without a default that are not offered.
    """
    if inspect.isclass(builder) and builder.__init__ is nn.Module.__init__:
        return {}  # a module without an __init__ of its own: nn.Module's takes no arguments
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): offer nothing
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(offered)
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [p.name for p in parameters if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
               and (p.name not in offered or p.kind is p.POSITIONAL_ONLY)]
    if missing:
        raise TypeError(f"it requires {', '.join(missing)}, which pyro-vae does not supply: a part gets "
                        f"only keyword arguments among {', '.join(offered)}")
    return {name: value for name, value in offered.items() if name in named}


@contextlib.contextmanager
def _probing(*modules: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and a private random state while probing: a probe changes no
    normalisation statistics, builds no graph and leaves the global generator where it was."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _probe_labels(num_classes: int) -> torch.Tensor | None:
    if not num_classes:
        return None
    return nn.functional.one_hot(torch.arange(PROBE_BATCH) % num_classes, num_classes).to(torch.get_default_dtype())


def check_part_output(result: Any, where: str, call: str, event_shape: tuple[int, ...] | None = None,
                      batch_shape: tuple[int, ...] = (PROBE_BATCH,)) -> Distribution:
    """Check that a part's ``forward`` returned a distribution with batch shape ``batch_shape``
    (the probe batch, and a leading particle dimension where the probe has one) and ``event_shape``
    where given; raise :class:`PartError` saying what came back otherwise."""
    if not isinstance(result, Distribution):
        raise PartError(f"{where}: {call} returned a {type(result).__name__}; expected a "
                        "torch.distributions.Distribution (e.g. a pyro.distributions one)")
    if tuple(result.batch_shape) != tuple(batch_shape):
        hint = ("a decoder must broadcast a leading particle dimension: z of shape (particles, batch, ...) "
                "gives batch shape (particles, batch)" if len(batch_shape) > 1 else
                "the batch (put per-point dimensions in the event shape, e.g. with .to_event(1))")
        raise PartError(f"{where}: {call} on z of shape {tuple(batch_shape)} + latent returned a distribution with "
                        f"batch shape {tuple(result.batch_shape)}; expected {tuple(batch_shape)}, {hint}"
                        if len(batch_shape) > 1 else
                        f"{where}: {call} returned a distribution with batch shape {tuple(result.batch_shape)}; "
                        f"expected {tuple(batch_shape)}, {hint}")
    if event_shape is not None and tuple(result.event_shape) != event_shape:
        raise PartError(f"{where}: {call} returned a distribution with event shape {tuple(result.event_shape)}; "
                        f"expected {event_shape}, one flat data point")
    return result


def build_user_part(value: str, option: str, offered: dict[str, Any]) -> nn.Module:
    """Import the part named by ``value`` and call it with the entries of ``offered`` its
    signature accepts; raise :class:`PartError` naming ``value`` if that fails or the result
    is not an ``nn.Module``.  The caller probes its ``forward``."""
    where = f"--{option} {value!r}"
    builder = import_part(value, option)
    try:
        kwargs = accepted_kwargs(builder, offered)
    except TypeError as error:
        raise PartError(f"{where}: cannot build it: {error}") from error
    call = f"{value.split(':')[1]}({', '.join(kwargs)})"
    try:
        part = builder(**kwargs)
    except Exception as error:
        raise PartError(f"{where}: building it as {call} failed with {type(error).__name__}: {error}") from error
    if not isinstance(part, nn.Module):
        raise PartError(f"{where}: {call} returned a {type(part).__name__}; expected a torch.nn.Module "
                        f"whose forward returns the {option}'s distribution")
    return part


def _probe(value: str, option: str, part: nn.Module, call: str, *args: Any,
           event_shape: tuple[int, ...] | None = None, batch_shape: tuple[int, ...] = (PROBE_BATCH,)
           ) -> Distribution:
    where = f"--{option} {value!r}"
    on = f"a batch of {PROBE_BATCH}" + (f" with {batch_shape[0]} particles" if len(batch_shape) > 1 else "")
    with _probing(part):
        try:
            result = part(*args)
        except Exception as error:
            raise PartError(f"{where}: probing {call} on {on} failed with "
                            f"{type(error).__name__}: {error}") from error
        return check_part_output(result, where, call, event_shape, batch_shape)


def _offered(config: ModelConfig, input_dim: int, k: int, image_shape: ImageShape, latent_dim: int,
             hidden: Sequence[int]) -> dict[str, Any]:
    values = (input_dim, latent_dim, list(hidden), config.activation, k,
              None if image_shape is None else tuple(image_shape))
    return {**dict(zip(PART_KWARGS, values)), "config": config}


# -- building ------------------------------------------------------------------------------------------

def _lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        module, _, attribute = name.rpartition(".")
        hint = f" (did you mean {module}:{attribute}?)" if module and attribute else ""
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(registry)} "
                         f"or an import path package.module:Name{hint}") from None


def _check_pairing(config: ModelConfig) -> None:
    check_pair(config.prior, config.guide)
    discrete_prior, discrete_guide = config.prior == DISCRETE, config.guide == DISCRETE
    if discrete_prior != discrete_guide:
        raise ValueError(
            f"prior {config.prior!r} and guide {config.guide!r} do not fit: discrete latents need "
            f"--prior {DISCRETE} together with --guide {DISCRETE}"
        )


def _num_conditions(config: ModelConfig, num_classes: int | None) -> int:
    if not config.conditional:
        return 0
    if not num_classes:
        raise ValueError("--conditional needs a labelled data set; this one has no labels")
    return num_classes


def _probe_inputs(input_dim: int) -> torch.Tensor:
    """Probe data in [0, 1], from a private generator (the global random state stays put)."""
    return torch.rand(PROBE_BATCH, input_dim, generator=torch.Generator().manual_seed(0))


def _build_guide(config: ModelConfig, input_dim: int, k: int, image_shape: ImageShape) -> nn.Module:
    if not is_import_path(config.guide):
        return _lookup(GUIDES, "guide", config.guide)(config, input_dim, k, image_shape)
    offered = _offered(config, input_dim, k, image_shape, config.latent_dim, config.hidden)
    guide = build_user_part(config.guide, "guide", offered)
    _probe(config.guide, "guide", guide, "forward(x, y)", _probe_inputs(input_dim), _probe_labels(k))
    return guide


def _build_prior(config: ModelConfig, input_dim: int, k: int, image_shape: ImageShape,
                 encoder: nn.Module | None) -> nn.Module:
    """The prior over the top latent (``z``, or ``z2`` with two layers; ``encoder`` is ``None`` then)."""
    latent_dim = config.prior_latent_dim
    if not is_import_path(config.prior):
        return _lookup(PRIORS, "prior", config.prior)(dataclasses.replace(config, latent_dim=latent_dim),
                                                      input_dim, k, encoder)
    offered = _offered(config, input_dim, k, image_shape, latent_dim, config.hidden)
    if encoder is not None:
        offered["encoder"] = encoder
    prior = build_user_part(config.prior, "prior", offered)
    _probe(config.prior, "prior", prior, f"forward({PROBE_BATCH}, y)", PROBE_BATCH, _probe_labels(k))
    return prior


def _build_decoder(config: ModelConfig, input_dim: int, k: int, image_shape: ImageShape,
                   latents: Distribution | None) -> nn.Module:
    """The decoder p(x | z); ``latents`` (batch ``(PROBE_BATCH,)``) supplies the probe's ``z``
    for a user's decoder."""
    discrete = config.prior == DISCRETE
    flat = dataclasses.replace(config, latent_dim=config.latent_dim * config.num_categories) if discrete else config
    if not is_import_path(config.decoder):
        decoder = _lookup(DECODERS, "decoder", config.decoder)(flat, input_dim, k, image_shape)
    else:
        offered = _offered(flat, input_dim, k, image_shape, flat.latent_dim, config.hidden[::-1])
        decoder = build_user_part(config.decoder, "decoder", offered)
    if discrete:
        decoder = CategoricalLatentDecoder(decoder, config.latent_dim, config.num_categories)
    if is_import_path(config.decoder) and latents is not None:
        with _probing(decoder):
            z = latents.sample()
            zs = latents.sample((PROBE_PARTICLES,))
        labels = _probe_labels(k)
        _probe(config.decoder, "decoder", decoder, "forward(z, y)", z, labels, event_shape=(input_dim,))
        _probe(config.decoder, "decoder", decoder, "forward(z, y)", zs, labels, event_shape=(input_dim,),
               batch_shape=(PROBE_PARTICLES, PROBE_BATCH))
    return decoder


def _probe_latents(config: ModelConfig, prior: nn.Module, encoder: nn.Module, input_dim: int, k: int
                   ) -> Distribution | None:
    """When a user's part is involved, check that prior and guide agree on the latent's event
    shape and return the guide's distribution at a probe batch (its draws feed the decoder probe)."""
    if not any(is_import_path(name) for name in (config.prior, config.guide, config.decoder)):
        return None
    with _probing(prior, encoder):
        q = encoder(_probe_inputs(input_dim), _probe_labels(k))
        p = prior(PROBE_BATCH, _probe_labels(k))
    if q.event_shape != p.event_shape:
        raise PartError(f"prior {config.prior!r} and guide {config.guide!r} disagree on the latent: event shapes "
                        f"{tuple(p.event_shape)} and {tuple(q.event_shape)}; expected the same shape")
    return q


def build_vae(config: ModelConfig, input_dim: int, num_classes: int | None = None,
              image_shape: Sequence[int] | None = None) -> VAE:
    """Assemble prior, encoder and decoder named in ``config`` for ``input_dim`` features.

    ``config`` is a :class:`ModelConfig`, or a training config whose ``model`` is one.
    ``num_classes`` is used only when ``config.conditional`` is set; ``image_shape``
    only with ``config.network == "conv"``.  The encoder is built first and handed
    to the prior builder.  One stochastic layer only (:func:`build_model` builds both).
    """
    config = getattr(config, "model", config)
    if config.stochastic_layers != 1:
        raise ValueError(f"build_vae builds one stochastic layer, got stochastic_layers={config.stochastic_layers}; "
                         "use build_model")
    k = _num_conditions(config, num_classes)
    _check_pairing(config)
    encoder = _build_guide(config, input_dim, k, image_shape)
    prior = _build_prior(config, input_dim, k, image_shape, encoder)
    latents = _probe_latents(config, prior, encoder, input_dim, k)
    decoder = _build_decoder(config, input_dim, k, image_shape, latents)
    return VAE(prior, encoder, decoder, num_classes=k)


def build_two_layer_vae(config: ModelConfig, input_dim: int, num_classes: int | None = None,
                        image_shape: Sequence[int] | None = None) -> TwoLayerVAE:
    """Assemble the two-stochastic-layer VAE of Burda et al. 2016 from ``config``.

    ``--prior`` is p(z2) (``top_latent_dim``), ``--guide`` is q(z1 | x) and
    ``--decoder`` is p(x | z1) (``latent_dim`` and ``hidden``, and ``network``
    for image data); p(z1 | z2) and q(z2 | z1) are diagonal Gaussians from MLPs
    with ``top_hidden`` units.  The paper's MNIST model is ``latent_dim=100,
    top_latent_dim=50, hidden=[200, 200], top_hidden=[100, 100], activation="tanh"``.
    """
    config = getattr(config, "model", config)
    config.validate()
    k = _num_conditions(config, num_classes)
    encoder_z1 = _build_guide(config, input_dim, k, image_shape)
    prior_z2 = _build_prior(config, input_dim, k, image_shape, None)
    encoder_z2 = DiagonalGaussianEncoder(config.latent_dim, config.top_latent_dim, config.top_hidden,
                                         config.activation, k)
    prior_z1 = DiagonalGaussianEncoder(config.top_latent_dim, config.latent_dim, config.top_hidden[::-1],
                                       config.activation, k)
    if is_import_path(config.prior):
        with _probing(prior_z2):
            p_z2 = prior_z2(PROBE_BATCH, _probe_labels(k))
        if tuple(p_z2.event_shape) != (config.top_latent_dim,):
            raise PartError(f"--prior {config.prior!r}: its distribution has event shape {tuple(p_z2.event_shape)}; "
                            f"expected ({config.top_latent_dim},), z2 of top_latent_dim features")
    latents = None
    if is_import_path(config.guide) or is_import_path(config.decoder):
        with _probing(encoder_z1):
            latents = encoder_z1(_probe_inputs(input_dim), _probe_labels(k))
        if tuple(latents.event_shape) != (config.latent_dim,):
            raise PartError(f"--guide {config.guide!r}: its distribution has event shape "
                            f"{tuple(latents.event_shape)}; expected ({config.latent_dim},), z1 of latent_dim "
                            "features")
    decoder = _build_decoder(config, input_dim, k, image_shape, latents)
    return TwoLayerVAE(prior_z2, prior_z1, decoder, encoder_z1, encoder_z2, num_classes=k)


def build_model(config: ModelConfig, input_dim: int, num_classes: int | None = None,
                image_shape: tuple[int, ...] | None = None) -> VAE | TwoLayerVAE:
    """The model ``config`` describes: a :class:`VAE` (``stochastic_layers=1``) or a
    :class:`TwoLayerVAE` (``stochastic_layers=2``), each an ``nn.Module`` with Pyro
    ``model(x, y=None)`` and ``guide(x, y=None)`` methods.

    ``input_dim`` is the number of data features, ``num_classes`` the number of
    labels (used with ``conditional``), ``image_shape`` the data's picture shape
    (needed by ``network="conv"``).
    """
    config = getattr(config, "model", config)
    config.validate()
    if config.stochastic_layers == 2:
        return build_two_layer_vae(config, input_dim, num_classes, image_shape)
    return build_vae(config, input_dim, num_classes, image_shape)
