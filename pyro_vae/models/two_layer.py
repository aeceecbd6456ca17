"""A VAE with two stochastic layers: the deeper architecture of Burda, Grosse & Salakhutdinov
2016, "Importance Weighted Autoencoders" (Sec. 5, the 2-stochastic-layer networks).

Generative model and guide::

    p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1),    p(z2) = N(0, I)
    q(z1, z2 | x) = q(z1 | x) q(z2 | z1)

with diagonal Gaussians ``p(z1 | z2)``, ``q(z1 | x)``, ``q(z2 | z1)`` whose means
and log-variances come from MLPs, and a Bernoulli ``p(x | z1)``.  The paper's
MNIST sizes are ``z1`` 100-d and ``z2`` 50-d, networks 784-200-200-(2x100) for
``q(z1 | x)``, 100-100-100-(2x50) for ``q(z2 | z1)``, 50-100-100-(2x100) for
``p(z1 | z2)`` and 100-200-200-784 for ``p(x | z1)``, with tanh units.

The importance weight is ``w = p(x | z1) p(z1 | z2) p(z2) / (q(z1 | x) q(z2 | z1))``;
Pyro's estimators compute it from the traces of :meth:`TwoLayerVAE.model` and
:meth:`TwoLayerVAE.guide`, whose sites ``z1``, ``z2`` and ``x`` all sit in
``pyro.plate("data", B)``.  Every network acts on the last dimension, so the
pair broadcasts a leading vectorized particle dimension.

``TraceMeanField_ELBO`` does not apply: the guide draws ``z2`` given ``z1``
while the model draws ``z1`` given ``z2``, so per-site closed-form KL terms
are not the ELBO's (the guide is not mean-field).  Use ``Trace_ELBO`` or the
importance-weighted and Renyi estimators.
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from pyro_vae.models.protocols import DecoderPart, EncoderPart, PriorPart, part_mean
from pyro_vae.models.vae import (
    DATA_PLATE,
    OBSERVED_SITE,
    forward_progress,
    module_device,
    one_hot_condition,
)

TOP_SITE = "z2"
BOTTOM_SITE = "z1"


class TwoLayerVAE(nn.Module):
    """p(z2) p(z1 | z2) p(x | z1) with the guide q(z1 | x) q(z2 | z1) (Burda et al. 2016).

    Parts, each following the protocols of :mod:`pyro_vae.models.protocols`:

    * ``prior_z2``: p(z2), called as ``prior_z2(B, y)``;
    * ``prior_z1``: p(z1 | z2), an encoder-like module called as ``prior_z1(z2, y)``;
    * ``decoder``: p(x | z1), called as ``decoder(z1, y)``;
    * ``encoder_z1``: q(z1 | x), called as ``encoder_z1(x, y)``;
    * ``encoder_z2``: q(z2 | z1), called as ``encoder_z2(z1, y)``.

    ``num_classes`` > 0 makes every conditional part see the one-hot label ``y``.
    """

    #: The latent sample sites, the one next to the data first.
    latent_sites = (BOTTOM_SITE, TOP_SITE)

    def __init__(self, prior_z2: PriorPart, prior_z1: EncoderPart, decoder: DecoderPart, encoder_z1: EncoderPart,
                 encoder_z2: EncoderPart, num_classes: int = 0, name: str = "vae") -> None:
        super().__init__()
        self.prior_z2 = prior_z2
        self.prior_z1 = prior_z1
        self.decoder = decoder
        self.encoder_z1 = encoder_z1
        self.encoder_z2 = encoder_z2
        self.num_classes = num_classes
        self.name = name
        self._check_sizes()

    def _declared_sizes(self, site: str) -> dict[str, int]:
        """The ``latent_dim`` each part of a layer declares (z1: q(z1 | x), p(z1 | z2), the
        decoder; z2: q(z2 | z1), p(z2)); parts without one are left out."""
        roles = {BOTTOM_SITE: ("encoder_z1", "prior_z1", "decoder"), TOP_SITE: ("encoder_z2", "prior_z2")}[site]
        return {role: getattr(self, role).latent_dim for role in roles if hasattr(getattr(self, role), "latent_dim")}

    def _check_sizes(self) -> None:
        for site in self.latent_sites:
            declared = self._declared_sizes(site)
            if len(set(declared.values())) > 1:
                raise ValueError(f"sizes of {site} disagree: "
                                 + ", ".join(f"{role} {dim}" for role, dim in declared.items()))

    def _latent_size(self, site: str) -> int:
        declared = self._declared_sizes(site)
        if declared:
            return next(iter(declared.values()))
        c = None if not self.num_classes else torch.zeros(1, self.num_classes, device=module_device(self))
        with torch.no_grad():
            p_z2 = self.prior_z2(1, c)
            if site == TOP_SITE:
                return p_z2.event_shape.numel()
            return self.prior_z1(p_z2.sample(), c).event_shape.numel()

    @property
    def latent_dim(self) -> int:
        """Size of ``z1``, the latent next to the data."""
        return self._latent_size(BOTTOM_SITE)

    @property
    def top_latent_dim(self) -> int:
        """Size of ``z2``."""
        return self._latent_size(TOP_SITE)

    def set_progress(self, step: int, steps_per_epoch: int) -> None:
        """Forward the trainer's per-step hook to the parts that define ``set_progress``."""
        forward_progress((self.prior_z2, self.prior_z1, self.decoder, self.encoder_z1, self.encoder_z2),
                         step, steps_per_epoch)

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """One-hot encode integer labels for a conditional model; ``None`` otherwise."""
        return one_hot_condition(y, self.num_classes)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """p(x, z1, z2) = p(x | z1) p(z1 | z2) p(z2) (Burda et al. 2016, Sec. 5)."""
        pyro.module(self.name, self)
        c = self.condition(y)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            z2 = pyro.sample(TOP_SITE, self.prior_z2(x.shape[0], c))
            z1 = pyro.sample(BOTTOM_SITE, self.prior_z1(z2, c))
            pyro.sample(OBSERVED_SITE, self.decoder(z1, c), obs=x)
        return z1

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """q(z1, z2 | x) = q(z1 | x) q(z2 | z1) (Burda et al. 2016, Sec. 5)."""
        pyro.module(self.name, self)
        c = self.condition(y)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            z1 = pyro.sample(BOTTOM_SITE, self.encoder_z1(x, c))
            pyro.sample(TOP_SITE, self.encoder_z2(z1, c))
        return z1

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean at one draw z1 ~ q(z1 | x)."""
        c = self.condition(y)
        return part_mean(self.decoder, self.encoder_z1(x, c).sample(), c)

    @torch.no_grad()
    def sample(self, num_samples: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder means at ``num_samples`` ancestral draws z2 ~ p(z2), z1 ~ p(z1 | z2)."""
        c = self.condition(y)
        z2 = self.prior_z2(num_samples, c).sample()
        return part_mean(self.decoder, self.prior_z1(z2, c).sample(), c)
