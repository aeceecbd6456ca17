"""Build a VAE from part names: the registries behind ``--prior``, ``--guide`` and ``--decoder``.

Each registry maps a name to a builder taking the :class:`~pyro_vae.config.TrainConfig`
and the data sizes.  A new part is one builder function and one entry here.
"""

from __future__ import annotations

from typing import Callable

from .config import TrainConfig
from .decoders import BernoulliDecoder, Decoder, GaussianDecoder
from .guides import DiagonalGaussianEncoder, Encoder
from .priors import Prior, StandardNormalPrior
from .vae import VAE

PriorBuilder = Callable[[TrainConfig, int, int], Prior]
EncoderBuilder = Callable[[TrainConfig, int, int], Encoder]
DecoderBuilder = Callable[[TrainConfig, int, int], Decoder]

PRIORS: dict[str, PriorBuilder] = {
    "normal": lambda c, d, k: StandardNormalPrior(c.latent_dim),
}
GUIDES: dict[str, EncoderBuilder] = {
    "diagonal": lambda c, d, k: DiagonalGaussianEncoder(d, c.latent_dim, c.hidden, c.activation, k),
}
DECODERS: dict[str, DecoderBuilder] = {
    "bernoulli": lambda c, d, k: BernoulliDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k),
    "gaussian": lambda c, d, k: GaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                sigma=c.sigma_x),
    "gaussian-learned": lambda c, d, k: GaussianDecoder(c.latent_dim, d, c.hidden[::-1], c.activation, k,
                                                        sigma=c.sigma_x, learn_sigma=True),
}


def _lookup(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(registry)}") from None


def build_vae(config: TrainConfig, input_dim: int, num_classes: int | None = None) -> VAE:
    """Assemble prior, encoder and decoder named in ``config`` for ``input_dim`` features.

    ``num_classes`` is used only when ``config.conditional`` is set.
    """
    k = 0
    if config.conditional:
        if not num_classes:
            raise ValueError(f"--conditional needs a labelled data set; {config.data!r} has no labels")
        k = num_classes
    prior = _lookup(PRIORS, "prior", config.prior)(config, input_dim, k)
    encoder = _lookup(GUIDES, "guide", config.guide)(config, input_dim, k)
    decoder = _lookup(DECODERS, "decoder", config.decoder)(config, input_dim, k)
    return VAE(prior, encoder, decoder, num_classes=k)
