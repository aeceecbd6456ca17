"""Programs a user writes without pyro-vae, used by the tests through the API and ``--program``.

``model``/``guide`` (module level, networks registered with ``pyro.module``)
is what ``--program user_programs`` imports.  :func:`two_site_program` builds
fresh networks with two latent sites of free names, and :func:`param_program`
keeps its parameters with ``pyro.param`` only.  The digits are grayscale, scored
as Bernoulli probabilities as in Pyro's VAE example (``validate_args=False``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

DIGITS = 64


def _nets(seed: int, latent: int, hidden: int = 32):
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Linear(DIGITS, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
    dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, DIGITS))
    with torch.no_grad():
        for p in (*enc.parameters(), *dec.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return enc, dec


encoder, decoder = _nets(0, 3)


def model(x):
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(3), x.new_ones(3)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1), obs=x)


def guide(x):
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        loc, log_scale = encoder(x).chunk(2, -1)
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def two_site_program(seed: int = 0):
    """Two latent sites, ``local`` (3-d, from x) and ``style`` (2-d, from local), fresh networks."""
    enc, dec = _nets(seed, 3)
    top_enc = nn.Linear(3, 4)
    top_dec = nn.Linear(2, 3)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every initial value from the seed, none from the global generator
        for p in (*top_enc.parameters(), *top_dec.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def model(x):
        pyro.module("dec", dec)
        pyro.module("top_dec", top_dec)
        with pyro.plate("data", x.shape[0]):
            style = pyro.sample("style", dist.Normal(x.new_zeros(2), x.new_ones(2)).to_event(1))
            local = pyro.sample("local", dist.Normal(top_dec(style), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(local), validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        pyro.module("top_enc", top_enc)
        with pyro.plate("data", x.shape[0]):
            loc, scale = enc(x).chunk(2, -1)
            local = pyro.sample("local", dist.Normal(loc, nn.functional.softplus(scale) + 1e-3).to_event(1))
            loc2, scale2 = top_enc(local).chunk(2, -1)
            pyro.sample("style", dist.Normal(loc2, nn.functional.softplus(scale2) + 1e-3).to_event(1))

    return model, guide


def param_program():
    """A linear-Gaussian-style program whose parameters live in Pyro's param store only."""

    def model(x):
        w = pyro.param("w", lambda: 0.1 * torch.randn(2, DIGITS))
        b = pyro.param("b", lambda: torch.zeros(DIGITS))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("code", dist.Normal(x.new_zeros(2), x.new_ones(2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ w + b, validate_args=False).to_event(1), obs=x)

    def guide(x):
        a = pyro.param("a", lambda: 0.01 * torch.randn(DIGITS, 2))
        s = pyro.param("s", lambda: torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("code", dist.Normal(x @ a, s.expand(x.shape[0], 2)).to_event(1))

    return model, guide
