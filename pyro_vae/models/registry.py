"""Build a VAE from part names: the registries behind ``--prior``, ``--guide`` and ``--decoder``.

Each registry maps a name to a builder taking the :class:`~pyro_vae.train.config.ModelConfig`
and the data sizes; prior builders also get the already-built encoder (the
VampPrior is a mixture of the guide).  A new part is one builder function and
one entry here.  See ``docs/parts.md`` for what each part is and which
objectives apply.
"""

from __future__ import annotations

from typing import Callable

from pyro_vae.models.config import ModelConfig
from pyro_vae.models.decoders import (
    BernoulliDecoder,
    ContinuousBernoulliDecoder,
    Decoder,
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
    Encoder,
    FullCovarianceEncoder,
    LowRankGaussianEncoder,
)
from pyro_vae.models.priors import (
    LearnedNormalPrior,
    MixtureOfGaussiansPrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
)
from pyro_vae.models.vae import VAE

PriorBuilder = Callable[[ModelConfig, int, int, Encoder], Prior]
EncoderBuilder = Callable[[ModelConfig, int, int], Encoder]
DecoderBuilder = Callable[[ModelConfig, int, int], Decoder]


def _schedule(c: ModelConfig) -> TemperatureSchedule:
    return TemperatureSchedule(c.temperature, c.temperature_min, c.temperature_anneal)


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
    "diagonal": lambda c, d, k: DiagonalGaussianEncoder(d, c.latent_dim, c.hidden, c.activation, k),
    "lowrank": lambda c, d, k: LowRankGaussianEncoder(d, c.latent_dim, c.guide_rank, c.hidden, c.activation, k),
    "full": lambda c, d, k: FullCovarianceEncoder(d, c.latent_dim, c.hidden, c.activation, k),
    "iaf": lambda c, d, k: IAFEncoder(d, c.latent_dim, c.flow_steps, c.flow_hidden, c.hidden, c.activation, k),
    "categorical": lambda c, d, k: RelaxedCategoricalEncoder(d, c.latent_dim, c.num_categories, c.hidden,
                                                             c.activation, k, _schedule(c), c.straight_through),
}
DECODERS: dict[str, DecoderBuilder] = {
    "bernoulli": lambda c, d, k: BernoulliDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k),
    "continuous-bernoulli": lambda c, d, k: ContinuousBernoulliDecoder(c.latent_dim, d, c.hidden[::-1],
                                                                       c.activation, k),
    "gaussian": lambda c, d, k: GaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                sigma=c.sigma_x),
    "gaussian-learned": lambda c, d, k: GaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                        sigma=c.sigma_x, learn_sigma=True),
    "gaussian-pixel": lambda c, d, k: PixelScaleGaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                                sigma=c.sigma_x),
}

#: Parts whose latent is categorical (event shape ``(latent_dim, num_categories)``); they pair only
#: with each other, and the decoder then reads ``latent_dim * num_categories`` one-hot features.
DISCRETE = "categorical"


def _lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(registry)}") from None


def _check_pairing(config: ModelConfig) -> None:
    discrete_prior, discrete_guide = config.prior == DISCRETE, config.guide == DISCRETE
    if discrete_prior != discrete_guide:
        raise ValueError(
            f"prior {config.prior!r} and guide {config.guide!r} do not fit: discrete latents need "
            f"--prior {DISCRETE} together with --guide {DISCRETE}"
        )


def build_vae(config: ModelConfig, input_dim: int, num_classes: int | None = None) -> VAE:
    """Assemble prior, encoder and decoder named in ``config`` for ``input_dim`` features.

    ``config`` is a :class:`ModelConfig`, or a training config whose ``model`` is one.

    ``num_classes`` is used only when ``config.conditional`` is set.  The encoder
    is built first and handed to the prior builder.
    """
    config = getattr(config, "model", config)
    k = 0
    if config.conditional:
        if not num_classes:
            raise ValueError("--conditional needs a labelled data set; this one has no labels")
        k = num_classes
    _check_pairing(config)
    encoder = _lookup(GUIDES, "guide", config.guide)(config, input_dim, k)
    prior = _lookup(PRIORS, "prior", config.prior)(config, input_dim, k, encoder)
    build_decoder = _lookup(DECODERS, "decoder", config.decoder)
    if config.prior == DISCRETE:
        flat = config.replace(latent_dim=config.latent_dim * config.num_categories)
        decoder = CategoricalLatentDecoder(build_decoder(flat, input_dim, k), config.latent_dim,
                                           config.num_categories)
    else:
        decoder = build_decoder(config, input_dim, k)
    return VAE(prior, encoder, decoder, num_classes=k)
