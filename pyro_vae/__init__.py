"""pyro-vae: variational autoencoders as Pyro model/guide pairs."""

from pyro_vae.infer.objectives import OBJECTIVES, make_elbo
from pyro_vae.models.config import ModelConfig
from pyro_vae.models.registry import DECODERS, GUIDES, PRIORS, build_vae
from pyro_vae.models.vae import VAE
from pyro_vae.train.config import TrainConfig

__version__ = "0.1.0"

__all__ = ["VAE", "ModelConfig", "TrainConfig", "build_vae", "make_elbo", "OBJECTIVES", "PRIORS", "GUIDES",
           "DECODERS", "__version__"]
