"""pyro-vae: variational autoencoders as Pyro model/guide pairs."""

from .config import TrainConfig
from .objectives import OBJECTIVES, make_elbo
from .parts import DECODERS, GUIDES, PRIORS, build_vae
from .vae import VAE

__version__ = "0.1.0"

__all__ = ["VAE", "TrainConfig", "build_vae", "make_elbo", "OBJECTIVES", "PRIORS", "GUIDES", "DECODERS",
           "__version__"]
