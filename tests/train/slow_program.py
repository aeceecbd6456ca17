"""A small model/guide program for the signal and lock tests, slowed down on request.

``--program slow_program:make`` builds fresh, seeded networks for the 64-pixel
digits; each guide call sleeps ``$SLOW_PROGRAM_DELAY`` seconds (default 0), so
a test can stop a training process in the middle of an epoch.
"""

from __future__ import annotations

import os
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

DIGITS = 64
LATENT = 2


def make():
    """A fresh (model, guide) pair with networks seeded the same on every call."""
    g = torch.Generator().manual_seed(0)
    enc = nn.Sequential(nn.Linear(DIGITS, 16), nn.Tanh(), nn.Linear(16, 2 * LATENT))
    dec = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, DIGITS))
    with torch.no_grad():
        for p in (*enc.parameters(), *dec.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    delay = float(os.environ.get("SLOW_PROGRAM_DELAY", "0"))

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), x.new_ones(LATENT)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z), validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        if delay and torch.is_grad_enabled():
            time.sleep(delay)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide
