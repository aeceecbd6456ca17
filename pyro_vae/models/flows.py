"""Normalizing-flow parts: a masked-autoregressive-flow prior and an inverse-autoregressive-flow guide.

Both are ``TransformedDistribution``s built from Pyro's affine autoregressive
transforms (MADE networks, Germain et al. 2015) and differ in which direction
is cheap.  An affine autoregressive step ``y = m(x) + s(x) * x`` with
autoregressive ``m, s`` maps ``x -> y`` in one network pass but inverts
``y -> x`` in ``r`` sequential passes.

* The prior needs ``log p(z)`` at codes drawn by the guide, i.e. the inverse
  direction ``z -> u``: it uses the steps as ``z = f^{-1}(u)`` so that density
  evaluation is one pass per step (MAF, Papamakarios et al. 2017; an
  autoregressive-flow prior as in Chen et al. 2017, "Variational Lossy
  Autoencoder").  Sampling it (pictures only) is the sequential direction.
* The guide needs draws and the log-density of its *own* draws: it pushes the
  encoder's Gaussian through amortized IAF steps conditioned on an encoder
  context ``h(x)`` (Kingma et al. 2016), one pass per step, and the transforms'
  cache returns the inverse of a draw for free.

Every step starts as the identity (zero output layer), so the prior starts as
N(0, I) and the guide as the diagonal Gaussian.  The MADE networks are
``nn.ModuleList`` members, so ``.to(device)`` and ``state_dict`` (including the
MADE permutations, which are buffers) work; the transforms around them are
built afresh on every call, so their caches never outlive a parameter update.
Change of variables (Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows"):
``log p(z) = log p_0(f^{-1}(z)) + log |det d f^{-1}(z) / dz|``.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch import nn

from pyro_vae.models.guides import Encoder, concat_condition
from pyro_vae.models.networks import encoder_network
from pyro_vae.models.priors import Prior


def start_at_identity(autoregressive_nn: nn.Module) -> None:
    """Zero the output layer of a MADE network so that its affine step starts as the
    identity (shift 0, log-scale 0): the flow starts as its base distribution."""
    last = autoregressive_nn.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def _check_flow_sizes(latent_dim: int, num_steps: int, hidden: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps (--flow-steps) must be a positive integer, got {num_steps!r}")
    if hidden < latent_dim:
        raise ValueError(f"flow hidden size (--flow-hidden) must be at least latent_dim={latent_dim}, "
                         f"got {hidden!r}")


class FlowPrior(Prior):
    """p(z): a standard normal ``u ~ N(0, I_r)`` pushed through ``num_steps`` inverted
    affine autoregressive steps, ``z = f_K^{-1}(... f_1^{-1}(u))`` (MAF, Papamakarios
    et al. 2017); its density is the change of variables above.  No KL to a flow is
    in closed form: ``meanfield`` falls back to Monte Carlo (with a warning)."""

    def __init__(self, latent_dim: int, num_steps: int = 2, hidden: int = 128) -> None:
        super().__init__()
        _check_flow_sizes(latent_dim, num_steps, hidden)
        self.latent_dim = latent_dim
        self.register_buffer("base_loc", torch.zeros(latent_dim))
        self.register_buffer("base_scale", torch.ones(latent_dim))
        self.networks = nn.ModuleList(AutoRegressiveNN(latent_dim, [hidden]) for _ in range(num_steps))
        for network in self.networks:
            start_at_identity(network)

    def forward(self, batch_size: int, y: torch.Tensor | None = None) -> dist.Distribution:
        # Fresh transforms around the registered networks on every call: a transform caches its last
        # input/output pair, which would go stale once an optimizer step changes the networks.
        steps = [T.AffineAutoregressive(network).inv for network in self.networks]
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return dist.TransformedDistribution(base, steps).expand([batch_size])


class IAFEncoder(Encoder):
    """q(z | x): the diagonal Gaussian guide ``z_0 ~ N(mu(x), diag(sigma^2(x)))`` followed
    by ``num_steps`` inverse autoregressive flow steps conditioned on a context
    ``h(x)`` emitted by the same encoder (Kingma et al. 2016, "Improved Variational
    Inference with Inverse Autoregressive Flow"), each the affine IAF step of their
    Eq. (10), ``z_t = m_t + s_t * z_{t-1}`` with ``m_t, log s_t`` autoregressive in
    ``z_{t-1}`` (MADE) and ``log s_t`` clipped to [-5, 3].

    ``log q(z_T | x) = log N(z_0) - sum_t sum_i log s_t,i`` (change of variables).
    The clipping bounds the inverse ``z_{t-1} = (z_t - m_t) / s_t``, which a
    VampPrior evaluates at codes the guide did not draw; the paper's gated
    "stable" variant ``z_t = g_t z_{t-1} + (1 - g_t) m_t`` divides by an unbounded
    ``1 / g_t`` there and produced NaNs in ``vamp x iaf`` training.
    """

    def __init__(self, input_dim: int, latent_dim: int, num_steps: int = 2, flow_hidden: int = 128,
                 hidden: Sequence[int] = (400,), activation: str = "relu", condition_dim: int = 0,
                 context_dim: int | None = None, network: str = "mlp",
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        _check_flow_sizes(latent_dim, num_steps, flow_hidden)
        self.latent_dim = latent_dim
        self.context_dim = flow_hidden if context_dim is None else context_dim
        self.net = encoder_network(input_dim, condition_dim, hidden, 2 * latent_dim + self.context_dim, activation,
                                   network, image_shape)
        self.steps = nn.ModuleList(
            T.ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, self.context_dim, [flow_hidden]))
            for _ in range(num_steps))
        for step in self.steps:
            start_at_identity(step.nn)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(mu, log_var, h)`` of the base Gaussian and the flow context."""
        out = self.net(concat_condition(x, y))
        r = self.latent_dim
        return out[..., :r], out[..., r:2 * r], out[..., 2 * r:]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        loc, log_var, context = self.encode(x, y)
        base = dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)
        return dist.TransformedDistribution(base, [step.condition(context) for step in self.steps])
