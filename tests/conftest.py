"""Shared fixtures and helpers of the test suite.

The tests mirror the package: ``tests/models``, ``tests/infer``,
``tests/train``, ``tests/evaluation``, ``tests/cli``, ``tests/data``.  This
folder is on ``sys.path`` (pytest puts a rootdir ``conftest.py``'s folder
there), so helper modules beside it, such as :mod:`linear_gaussian`, import by
name from any test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae.data import DATA_ENV_VAR, load_dataset


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits, embedded: no download."""
    return load_dataset("digits")


def fresh(seed: int = 0) -> None:
    """Seed every generator and empty Pyro's parameter store."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()


def shared_data_dir() -> Path | None:
    """``$PYRO_VAE_DATA`` when set: then tests that need MNIST must find it there (CI sets it)."""
    value = os.environ.get(DATA_ENV_VAR)
    return Path(value) if value else None


@pytest.fixture
def cpu_threads():
    """Keep torch's thread count as the test found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter of ``module`` off its initialisation (correlated guides start
    diagonal, flows at the identity), so that tests see a part's general case."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def grid_mass(log_prob, lim: float = 6.0, n: int = 241) -> float:
    """Integral of ``exp(log_prob)`` over ``[-lim, lim]^2`` by the trapezoid rule (a 2-D latent)."""
    t = torch.linspace(-lim, lim, n, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        density = log_prob(zz.float()).double().exp().reshape(n, n)
    return torch.trapezoid(torch.trapezoid(density, t, dim=-1), t).item()


def wait_for_file(path: Path, process, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists while ``process`` (a ``subprocess.Popen``) runs; fail, naming
    what happened, if it ends first or ``timeout`` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before {path.name} appeared: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
