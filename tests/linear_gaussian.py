"""A linear-Gaussian VAE whose evidence and posterior are known in closed form.

Prior ``z ~ N(0, I_r)``, decoder ``x = W z + b + sigma * noise``.  Then
``p(x) = N(b, W W^T + sigma^2 I)`` and the posterior is Gaussian with
``Sigma_post = (I + W^T W / sigma^2)^{-1}`` and
``mu_post = Sigma_post W^T (x - b) / sigma^2``.  Tests use it to check that
every bound sits below the exact ``log p(x)`` and that the exact posterior
as a guide makes the ELBO tight.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.models.decoders import Decoder
from pyro_vae.models.guides import DiagonalGaussianEncoder, Encoder
from pyro_vae.models.priors import StandardNormalPrior
from pyro_vae.models.vae import VAE


class LinearGaussianDecoder(Decoder):
    """p(x | z) = N(W z + b, sigma^2 I) with fixed W, b, sigma."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float) -> None:
        nn.Module.__init__(self)
        self.latent_dim = W.shape[1]
        self.output_dim = W.shape[0]
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.sigma = sigma

    def mean(self, z, y=None):
        return z @ self.W.T + self.b

    def forward(self, z, y=None):
        loc = self.mean(z)
        return dist.Normal(loc, torch.full_like(loc, self.sigma)).to_event(1)


class ExactPosteriorEncoder(Encoder):
    """q(z | x) = p(z | x), full covariance, optionally with the scale shrunk by ``narrow``."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float, narrow: float = 1.0) -> None:
        super().__init__()
        self.latent_dim = W.shape[1]
        precision = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / sigma**2
        self.register_buffer("cov", torch.linalg.inv(precision) * narrow**2)
        self.register_buffer("gain", torch.linalg.inv(precision) @ W.T / sigma**2)
        self.register_buffer("b", b)

    def forward(self, x, y=None):
        loc = (x - self.b) @ self.gain.T
        return dist.MultivariateNormal(loc, covariance_matrix=self.cov.expand(*loc.shape[:-1], *self.cov.shape))


class LinearGaussianProblem:
    """Random W, b, sigma and data drawn from the model, with the exact log p(x)."""

    def __init__(self, data_dim: int = 5, latent_dim: int = 2, sigma: float = 0.5, n: int = 64,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64)
        self.b = torch.randn(data_dim, generator=g, dtype=torch.float64)
        self.sigma = sigma
        z = torch.randn(n, latent_dim, generator=g, dtype=torch.float64)
        self.x = z @ self.W.T + self.b + sigma * torch.randn(n, data_dim, generator=g, dtype=torch.float64)

    def log_evidence(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``log p(x) = log N(x; b, W W^T + sigma^2 I)`` per data point."""
        x = self.x if x is None else x
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def vae(self, guide: str = "exact", narrow: float = 1.0) -> VAE:
        """A VAE with the exact decoder and either the exact posterior (``guide='exact'``)
        or an untrained diagonal-Gaussian MLP encoder (``guide='mlp'``), in float64."""
        decoder = LinearGaussianDecoder(self.W, self.b, self.sigma)
        latent = self.W.shape[1]
        if guide == "exact":
            encoder = ExactPosteriorEncoder(self.W, self.b, self.sigma, narrow)
        else:
            encoder = DiagonalGaussianEncoder(self.W.shape[0], latent, hidden=(16,)).double()
        return VAE(StandardNormalPrior(latent).double(), encoder, decoder)
