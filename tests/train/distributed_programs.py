"""Programs and worker functions for the tests of data-parallel training and evaluation.

``--program distributed_programs:delta`` is a program whose loss is a function
of the batch alone: its guide is a reparameterized ``Delta`` at an encoder's
output, so the ELBO is ``log p(x, z(x))`` with no sampling noise, and a run of
two processes must reach the parameters of one process up to rounding.
:func:`train_worker` is the target of ``torch.multiprocessing.spawn`` for the
Python-API case (a process group initialized by the caller).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

DIGITS = 64
LATENT = 2


def delta():
    """A fresh (model, guide) pair with networks seeded the same on every call."""
    g = torch.Generator().manual_seed(0)
    enc = nn.Sequential(nn.Linear(DIGITS, 16), nn.Tanh(), nn.Linear(16, LATENT))
    dec = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, DIGITS))
    with torch.no_grad():
        for p in (*enc.parameters(), *dec.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), x.new_ones(LATENT)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z), validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(enc(x), event_dim=1))

    return model, guide


def digits_subset(train: int, valid: int):
    """The first ``train`` training and ``valid`` validation points of the digits."""
    from pyro_vae.data import Dataset, load_dataset

    ds = load_dataset("digits")
    return Dataset(name=ds.name, train=ds.train[:train], valid=ds.valid[:valid], test=ds.test[:valid],
                   train_labels=None, valid_labels=None, test_labels=None, image_shape=ds.image_shape,
                   binary=ds.binary, dynamic_binarization=ds.dynamic_binarization, num_classes=None)


def train_worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    """One rank of a spawned run: join a gloo group by TCP, then ``train`` each job
    (``{"config": flat options, "resume": bool, "subset": (train, valid)}``) on the digits
    with the Delta program."""
    import torch.distributed as dist_

    from pyro_vae.train.config import TrainConfig
    from pyro_vae.train.trainer import train

    torch.set_num_threads(1)
    dist_.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for job in jobs:
            pyro.clear_param_store()  # a fresh program starts from its own parameters
            dataset = digits_subset(*job["subset"]) if "subset" in job else None
            train(TrainConfig.from_flat(job["config"]), program=delta(), dataset=dataset,
                  resume=job.get("resume", False))
    finally:
        dist_.destroy_process_group()
