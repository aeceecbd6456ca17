"""``torchrun --nproc_per_node 2 -m pyro_vae evaluate`` gives the numbers of one process.

Each point's draws are seeded from the seed and the point's index, and the ranks
take whole blocks of the chunk plan, so with the plan of one process (one torch
thread, as ``torchrun`` sets) the per-point results, and so every figure of the
report, are those of a single-process evaluation.  Rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.evaluation.run import evaluate
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.distributed import LAUNCH_VARIABLES
from pyro_vae.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
PARTICLES = 100  # the digits' 270 test points then make three blocks of traces: 119 + 119 + 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    train(TrainConfig.from_flat(dict(epochs=2, latent_dim=4, hidden=[32], batch_size=64, patience=0, device="cpu",
                                     progress=False, run_dir=str(run))), dataset=digits)
    return run


def _without_timings(results: dict) -> dict:
    results = dict(results, seconds=None, latent=dict(results["latent"], kl_per_dim=None),
                   latent_sites={name: dict(site, kl_per_dim=None) for name, site in results["latent_sites"].items()})
    return results


def test_distributed_evaluation_equals_single_process_evaluation(trained, tmp_path, cpu_threads):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    two = tmp_path / "two"
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), "-m", "pyro_vae", "evaluate", str(trained), "--particles",
                            str(PARTICLES), "--seed", "4", "--device", "cpu", "--no-progress", "--no-plots", "--out", str(two)],
                           env=env, capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, child.stderr
    assert child.stdout.count("test set, 270 points") == 1  # rank 0 reports, once
    assert sorted(p.name for p in two.iterdir()) == ["evaluation.json", "evaluation.md"]
    distributed = json.loads((two / "evaluation.json").read_text())
    assert distributed["processes"] == 2

    torch.set_num_threads(1)
    single = evaluate(trained, PARTICLES, seed=4, device="cpu", plots_=False, out_dir=tmp_path / "one")
    assert "processes" not in single
    a, b = distributed["results"], json.loads(json.dumps(single["results"]))
    assert a["chunking"]["block_points"] == 119 and a["num_points"] == 270
    assert _without_timings(a) == _without_timings(b)  # every figure, exactly
    assert a["latent"]["kl_per_dim"] == pytest.approx(b["latent"]["kl_per_dim"], rel=1e-12)  # sums in rank order
