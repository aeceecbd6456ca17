"""pyro-vae: variational autoencoders as Pyro model/guide pairs.

The public API::

    from pyro_vae import VAE, TrainConfig, ModelConfig, train, evaluate, load_run, load_dataset

``train`` takes the library's model (from a :class:`ModelConfig`) or any
model/guide pair of your own; ``evaluate`` and ``load_run`` reopen the run.
"""

from pyro_vae.cli import startup

if startup.is_command_line():  # before the slow imports: a stop signal now ends the command quietly
    startup.quiet_stops()

from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.infer.objectives import OBJECTIVES, make_elbo  # noqa: E402
from pyro_vae.infer.scale import latent_scale  # noqa: E402
from pyro_vae.models.config import ModelConfig  # noqa: E402
from pyro_vae.models.registry import DECODERS, GUIDES, PRIORS, build_model, build_vae  # noqa: E402
from pyro_vae.models.two_layer import TwoLayerVAE  # noqa: E402
from pyro_vae.models.vae import VAE  # noqa: E402
from pyro_vae.train.config import TrainConfig  # noqa: E402
from pyro_vae.train.program import Program  # noqa: E402
from pyro_vae.train.runs import Run, load_run  # noqa: E402
from pyro_vae.train.trainer import Trainer, TrainResult, train  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # evaluate pulls in matplotlib for its pictures: imported on first use only
    if name == "evaluate":
        from pyro_vae.evaluation.run import evaluate

        return evaluate
    raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")


__all__ = ["VAE", "ModelConfig", "TrainConfig", "Program", "Trainer", "TrainResult", "Run", "train", "evaluate",
           "load_run", "load_dataset", "build_model", "build_vae", "TwoLayerVAE", "make_elbo", "latent_scale", "OBJECTIVES", "PRIORS", "GUIDES",
           "DECODERS", "__version__"]
