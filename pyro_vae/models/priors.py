"""Priors p(z): modules that return a Pyro distribution for the latent site.

A prior's ``forward(batch_size, y=None)`` returns a distribution whose batch
shape is ``(batch_size,)`` (the data plate) and whose event shape is the latent
shape, so the same object serves under ``pyro.plate("data")`` with or without a
leading vectorized particle dimension (the
:class:`~pyro_vae.models.protocols.PriorPart` protocol).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class Prior(nn.Module):
    """Optional base of a prior with a ``latent_dim``: ``forward(batch_size, y=None) -> Distribution``
    over ``z``.  Any ``nn.Module`` with that ``forward`` is a prior."""

    latent_dim: int

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:  # pragma: no cover
        raise NotImplementedError


class StandardNormalPrior(Prior):
    """p(z) = N(0, I_r), the prior of docs/derivations.md (D1)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        # Buffers follow ``.to(device)``, so the prior lives where the model does.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).expand([batch_size, self.latent_dim]).to_event(1)


class LearnedNormalPrior(Prior):
    """p(z) = N(m, diag(s^2)) with learnable ``m`` and ``log s`` (an empirical-Bayes
    Gaussian prior: (D1) of docs/derivations.md with the prior's parameters in theta).  With a
    diagonal guide the KL stays in closed form, (D8):
    ``KL(N(mu, sigma^2) || N(m, s^2))``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).expand([batch_size, self.latent_dim]).to_event(1)


class ComponentMixture(dist.MixtureSameFamily):
    """``MixtureSameFamily`` whose ``log_prob`` broadcasts the value against the
    components explicitly, so components that only broadcast their parameters
    along the last batch dimension (flows conditioned on one context per
    component, e.g. the IAF guide inside a VampPrior) evaluate correctly:
    ``log p(z) = logsumexp_k (log pi_k + log p_k(z))``."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        event_dims = len(self.event_shape)
        x = value.unsqueeze(-1 - event_dims)
        batch = torch.broadcast_shapes(x.shape[:x.dim() - event_dims], self.component_distribution.batch_shape)
        log_prob_x = self.component_distribution.log_prob(x.expand(*batch, *self.event_shape))
        log_weights = torch.log_softmax(self.mixture_distribution.logits, dim=-1)
        return torch.logsumexp(log_prob_x + log_weights, dim=-1)


class MixtureOfGaussiansPrior(Prior):
    """p(z) = sum_c pi_c N(z; m_c, diag(s_c^2)) with learnable weights, means and scales
    (the mixture-of-Gaussians prior of Dilokthanakul et al. 2016, discussed as the
    VampPrior's precursor by Tomczak & Welling 2018).  No KL to a mixture is in closed form: ``meanfield`` falls
    back to a Monte Carlo estimate (with a warning from the trainer)."""

    def __init__(self, latent_dim: int, num_components: int = 10) -> None:
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be a positive integer, got {num_components!r}")
        self.latent_dim = latent_dim
        self.num_components = num_components
        # spread the means so the components start distinguishable
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(num_components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return ComponentMixture(dist.Categorical(logits=self.logits), components).expand([batch_size])


class VampPrior(Prior):
    """VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"): p(z) = (1/K) sum_k q(z | u_k), the
    guide's own distribution at ``K`` learnable pseudo-inputs ``u_k``.

    The encoder is shared with the guide but *not* registered as a submodule
    here (it belongs to the VAE once), so the prior's ``state_dict`` holds the
    pseudo-inputs only.  Pseudo-inputs start as uniform draws in [0, 1], the
    range of the (binarized or grayscale) pixel data.  For a conditional guide
    each pseudo-input also carries learnable label logits, fed to the encoder as
    a soft one-hot label, so the prior stays unconditional (``y`` is ignored).
    """

    def __init__(self, encoder: nn.Module, input_dim: int, num_pseudo_inputs: int = 100,
                 condition_dim: int = 0) -> None:
        super().__init__()
        if num_pseudo_inputs < 1:
            raise ValueError(f"num_pseudo_inputs must be a positive integer, got {num_pseudo_inputs!r}")
        self._encoder = (encoder,)  # a tuple hides it from nn.Module registration
        if hasattr(encoder, "latent_dim"):
            self.latent_dim = encoder.latent_dim
        self.num_pseudo_inputs = num_pseudo_inputs
        self.pseudo_inputs = nn.Parameter(torch.rand(num_pseudo_inputs, input_dim))
        self.pseudo_label_logits = (nn.Parameter(torch.zeros(num_pseudo_inputs, condition_dim))
                                    if condition_dim else None)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        labels = None if self.pseudo_label_logits is None else self.pseudo_label_logits.softmax(-1)
        components = self.encoder(self.pseudo_inputs, labels)  # batch (K,), the guide's event shape
        uniform = dist.Categorical(logits=self.pseudo_inputs.new_zeros(self.num_pseudo_inputs))
        return ComponentMixture(uniform, components).expand([batch_size])
