"""The VAE as a Pyro model/guide pair.

``model(x, y=None)`` draws ``z ~ p(z)`` and scores ``x ~ p(x | z)``;
``guide(x, y=None)`` draws ``z ~ q(z | x)``.  Both put their sites inside
``pyro.plate("data", B)`` with the batch as the plate, so any Pyro estimator
sees the batch structure and can add a vectorized particle dimension on the
left.  The data plate is never subsampled: its size is the batch, and scaling
to the data set size happens outside the bound (a subsampled plate's N/B scale
would land inside RenyiELBO's log-weights).

beta-VAE and KL warm-up are not part of the model: the trainer runs the
estimator under :func:`~pyro_vae.infer.scale.latent_scale`, which scales the
latent site in both programs.
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from pyro_vae.models.decoders import Decoder
from pyro_vae.models.guides import Encoder
from pyro_vae.models.priors import Prior

LATENT_SITE = "z"
OBSERVED_SITE = "x"
DATA_PLATE = "data"


class VAE(nn.Module):
    """A VAE built from three swappable parts: ``prior``, ``encoder`` (the guide's
    network) and ``decoder``.

    ``num_classes`` > 0 makes it conditional: the label ``y`` (int class indices,
    one-hot encoded here) enters both ``p(x | z, y)`` and ``q(z | x, y)``.
    """

    def __init__(self, prior: Prior, encoder: Encoder, decoder: Decoder, num_classes: int = 0,
                 name: str = "vae") -> None:
        super().__init__()
        if prior.latent_dim != encoder.latent_dim or decoder.latent_dim != prior.latent_dim:
            raise ValueError(
                f"latent sizes disagree: prior {prior.latent_dim}, encoder {encoder.latent_dim}, "
                f"decoder {decoder.latent_dim}"
            )
        self.prior = prior
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.name = name

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    def set_progress(self, step: int, steps_per_epoch: int) -> None:
        """Called by the trainer before every step: parts with schedules of their
        own (e.g. a relaxation temperature) define ``set_progress`` too."""
        for part in (self.prior, self.encoder, self.decoder):
            hook = getattr(part, "set_progress", None)
            if hook is not None:
                hook(step, steps_per_epoch)

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """One-hot encode integer labels for a conditional VAE; ``None`` otherwise."""
        if not self.num_classes:
            return None
        if y is None:
            raise ValueError("this VAE is conditional (num_classes="
                             f"{self.num_classes}): pass labels y with x")
        if y.dtype.is_floating_point:
            return y
        return nn.functional.one_hot(y, self.num_classes).to(torch.get_default_dtype())

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Generative model p(x, z) = p(x | z) p(z) (Sec. 1.2)."""
        pyro.module(self.name, self)
        c = self.condition(y)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            z = pyro.sample(LATENT_SITE, self.prior(x.shape[0], c))
            pyro.sample(OBSERVED_SITE, self.decoder(z, c), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Amortized guide q(z | x) (Sec. 1.2)."""
        pyro.module(self.name, self)
        c = self.condition(y)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            return pyro.sample(LATENT_SITE, self.encoder(x, c))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean at one draw z ~ q(z | x)."""
        c = self.condition(y)
        z = self.encoder(x, c).sample()
        return self.decoder.mean(z, c)

    @torch.no_grad()
    def sample(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder means at ``num_samples`` draws from the prior."""
        c = self.condition(y)
        z = self.prior(num_samples, c).sample()
        return self.decoder.mean(z, c)
