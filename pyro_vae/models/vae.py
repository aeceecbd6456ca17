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

from typing import Iterable

import pyro
import torch
from torch import nn

from pyro_vae.models.protocols import DecoderPart, EncoderPart, PriorPart, part_mean

LATENT_SITE = "z"
OBSERVED_SITE = "x"
DATA_PLATE = "data"


def one_hot_condition(y: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """The conditioning vector of a conditional VAE: integer labels one-hot encoded
    (float labels pass through as soft labels); ``None`` when ``num_classes`` is 0."""
    if not num_classes:
        return None
    if y is None:
        raise ValueError(f"this VAE is conditional (num_classes={num_classes}): pass labels y with x")
    if y.dtype.is_floating_point:
        return y
    return nn.functional.one_hot(y, num_classes).to(torch.get_default_dtype())


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` keeps its first parameter or buffer (the CPU if it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def forward_progress(parts: Iterable[object], step: int, steps_per_epoch: int) -> None:
    """Call ``set_progress(step, steps_per_epoch)`` on every part that defines it."""
    for part in parts:
        hook = getattr(part, "set_progress", None)
        if callable(hook):
            hook(step, steps_per_epoch)


class VAE(nn.Module):
    """A VAE built from three swappable parts: ``prior``, ``encoder`` (the guide's
    network) and ``decoder``, each any ``nn.Module`` following the protocols of
    :mod:`pyro_vae.models.protocols`.

    ``num_classes`` > 0 makes it conditional: the label ``y`` (int class indices,
    one-hot encoded here) enters both ``p(x | z, y)`` and ``q(z | x, y)``.
    Parts that declare a ``latent_dim`` must agree on it; parts without one are
    not checked here (the registry probes the parts it imports).
    """

    #: The latent sample sites, outermost first.
    latent_sites = (LATENT_SITE,)

    def __init__(self, prior: PriorPart, encoder: EncoderPart, decoder: DecoderPart, num_classes: int = 0,
                 name: str = "vae") -> None:
        super().__init__()
        declared = {role: getattr(part, "latent_dim") for role, part in
                    (("prior", prior), ("encoder", encoder), ("decoder", decoder)) if hasattr(part, "latent_dim")}
        if len(set(declared.values())) > 1:
            raise ValueError("latent sizes disagree: " + ", ".join(f"{role} {dim}" for role, dim in declared.items()))
        self.prior = prior
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.name = name

    @property
    def latent_dim(self) -> int:
        """Number of latent features: a part's declared ``latent_dim``, else the prior's event size."""
        for part in (self.prior, self.encoder, self.decoder):
            if hasattr(part, "latent_dim"):
                return part.latent_dim
        c = None if not self.num_classes else torch.zeros(1, self.num_classes, device=module_device(self))
        with torch.no_grad():
            return self.prior(1, c).event_shape.numel()

    def set_progress(self, step: int, steps_per_epoch: int) -> None:
        """Called by the trainer before every step: parts with schedules of their
        own (e.g. a relaxation temperature) define ``set_progress`` too."""
        forward_progress((self.prior, self.encoder, self.decoder), step, steps_per_epoch)

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """One-hot encode integer labels for a conditional VAE; ``None`` otherwise."""
        return one_hot_condition(y, self.num_classes)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Generative model p(x, z) = p(x | z) p(z) (docs/derivations.md (D1))."""
        pyro.module(self.name, self)
        c = self.condition(y)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            z = pyro.sample(LATENT_SITE, self.prior(x.shape[0], c))
            pyro.sample(OBSERVED_SITE, self.decoder(z, c), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Amortized guide q(z | x) (docs/derivations.md (D3))."""
        pyro.module(self.name, self)
        c = self.condition(y)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            return pyro.sample(LATENT_SITE, self.encoder(x, c))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean at one draw z ~ q(z | x)."""
        c = self.condition(y)
        z = self.encoder(x, c).sample()
        return part_mean(self.decoder, z, c)

    @torch.no_grad()
    def sample(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder means at ``num_samples`` draws from the prior."""
        c = self.condition(y)
        z = self.prior(num_samples, c).sample()
        return part_mean(self.decoder, z, c)
