"""Train, resume, evaluate and sample a VAE written as two plain Pyro functions.

The model and guide below are what a Pyro user writes first: networks
registered with ``pyro.module``, sites inside ``pyro.plate("data", B)``.
Nothing in them knows pyro-vae.  The same file works from the command line,
because ``--program`` takes a module with top-level ``model`` and ``guide``::

    PYTHONPATH=experiments pyro-vae train --program plain_functions --epochs 5 --run-dir runs/plain
    PYTHONPATH=experiments pyro-vae train --resume runs/plain --epochs 10
    PYTHONPATH=experiments pyro-vae evaluate runs/plain --particles 500
    PYTHONPATH=experiments pyro-vae sample runs/plain

or from Python: ``python experiments/plain_functions.py --epochs 5``.
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

INPUT_DIM, HIDDEN, LATENT = 64, 200, 8  # scikit-learn's 8x8 digits

encoder = nn.Sequential(nn.Linear(INPUT_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * LATENT))
decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, INPUT_DIM))


def model(x: torch.Tensor) -> None:
    """p(z) = N(0, I), p(x | z) = Bernoulli(sigmoid(decoder(z))); grayscale pixels are scored as
    Bernoulli probabilities, as in Pyro's own VAE example (hence ``validate_args=False``)."""
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), x.new_ones(LATENT)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1), obs=x)


def guide(x: torch.Tensor) -> None:
    """q(z | x) = N(mu(x), diag sigma(x)^2)."""
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        loc, log_scale = encoder(x).chunk(2, dim=-1)
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def main() -> None:
    from pyro_vae import TrainConfig, evaluate, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--objective", default="trace")
    parser.add_argument("--run-dir", default="runs/plain-functions")
    parser.add_argument("--particles", type=int, default=500, help="importance samples for the evaluation")
    args = parser.parse_args()
    config = TrainConfig(data="digits", epochs=args.epochs, objective=args.objective, run_dir=args.run_dir)
    result = train(config, program=(model, guide))
    print(f"trained {len(result.history)} epochs into {result.run_dir}")
    report = evaluate(result.run_dir, args.particles, program=(model, guide))
    print(f"test log p(x) = {report['results']['log_likelihood']['mean']:.2f} nats "
          f"(K={args.particles}); ELBO {report['results']['elbo']['mean']:.2f}")


if __name__ == "__main__":
    main()
