"""Data-parallel training on two CPU processes with gloo (pyro_vae.train.distributed).

* A program whose loss is a function of the batch alone (``distributed_programs:delta``)
  reaches, on two processes spawned through the Python API, the parameters of one
  process: sharding, the all-reduce and the lockstep steps are exact up to rounding.
  Its checkpoints continue across world sizes (1 -> 2 and 2 -> 1).
* ``torchrun ... -m pyro_vae train`` of the built-in VAE: one set of files in the run
  directory, losses that agree with one process's statistically, a SIGTERM to one
  rank that stops both at the same step and resumes bit-for-bit, a SIGKILL of one rank
  that leaves the last checkpoint whole.
* A half-configured launch environment is a one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from conftest import wait_for_file
from distributed_programs import delta, digits_subset, train_worker

from pyro_vae.cli.main import main
from pyro_vae.train.checkpoint import load_checkpoint
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.distributed import (LAUNCH_VARIABLES, DistributedSetupError, WorldSizeChangedWarning,
                                        launch_environment, rank_device, shard_bounds)
from pyro_vae.train.rundir import run_status
from pyro_vae.train.trainer import train

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
DELTA = dict(program="distributed_programs:delta", batch_size=64, progress=False, patience=0, device="cpu")
VAE = ["--latent-dim", "4", "--hidden", "32", "--batch-size", "64", "--patience", "0", "--device", "cpu",
       "--no-progress", "--checkpoint-every-steps", "5"]
VAE_EPOCHS = 3
SHORT = (129, 3)  # training and validation points of the run with a one-point last batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    path = os.pathsep.join([str(TESTS / "train"), str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def torchrun(argv: list[str], cwd: Path) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m pyro_vae ARGV`` on a free port."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "-m", "pyro_vae", *argv],
                            cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    return out, err


def params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["program"]["params"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def one_thread(cpu_threads, monkeypatch):
    torch.set_num_threads(1)  # the thread count of the launched processes: the same arithmetic
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# -- the launch environment ---------------------------------------------------------------------

def test_a_half_configured_launch_environment_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--epochs", "1", "--no-progress", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("pyro-vae train: error: incomplete torch.distributed launch environment: WORLD_SIZE is "
                          "set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not; start the processes with "
                          "torchrun")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    assert "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not" in capsys.readouterr().err
    full = {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(DistributedSetupError, match=r"RANK='2' is not an integer in \[0, 1\]"):
        launch_environment(full)
    assert launch_environment({**full, "RANK": "1"}).rank == 1
    assert launch_environment({"MASTER_ADDR": "somewhere"}) is None  # not a launch


def test_each_rank_takes_its_own_gpu_and_a_gpu_named_for_all_is_refused(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert rank_device(torch.device("cuda"), "auto", 2, 8) == torch.device("cuda", 2) and chosen == [2]
    assert rank_device(torch.device("cuda", 3), "cuda:3", 3, 8) == torch.device("cuda", 3)
    with pytest.raises(DistributedSetupError, match="--device cuda:1 names one GPU for all 8 processes"):
        rank_device(torch.device("cuda", 1), "cuda:1", 0, 8)
    assert rank_device(torch.device("cuda", 1), "cuda:1", 0, 8, explicit=True) == torch.device("cuda", 1)
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK 5 has no GPU: this node has 4 CUDA devices"):
        rank_device(torch.device("cuda"), "cuda", 5, 8)
    with pytest.raises(DistributedSetupError, match="not mps"):
        rank_device(torch.device("mps"), "mps", 0, 2)
    assert rank_device(torch.device("cpu"), "cpu", 1, 2) == torch.device("cpu")


def test_shards_cover_the_batch_in_order():
    for n in (1, 2, 7, 64):
        bounds = [shard_bounds(n, r, 3) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


# -- a deterministic program through the Python API -----------------------------------------------

@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Two spawned ranks (gloo, initialized by the caller) train the Delta program for two epochs,
    and continue a one-process run of one epoch to two."""
    root = tmp_path_factory.mktemp("spawned")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pyro.clear_param_store()
        train(TrainConfig.from_flat(dict(DELTA, epochs=1, run_dir=str(root / "from_one"))), program=delta())
    finally:
        torch.set_num_threads(threads)
    jobs = [{"config": dict(DELTA, epochs=2, run_dir=str(root / "two"))},
            {"config": dict(DELTA, epochs=2, run_dir=str(root / "from_one")), "resume": True},
            {"config": dict(DELTA, epochs=2, run_dir=str(root / "short")), "subset": SHORT},
            {"config": dict(DELTA, epochs=2, max_steps=7, run_dir=str(root / "paused"))},
            {"config": dict(DELTA, epochs=2, max_steps=7, run_dir=str(root / "in_pieces"))},
            {"config": dict(DELTA, epochs=2, run_dir=str(root / "in_pieces")), "resume": True}]
    sys.path.insert(0, str(TESTS / "train"))  # the children import the worker by name
    try:
        mp.spawn(train_worker, args=(2, free_port(), jobs), nprocs=2, join=True)
    finally:
        sys.path.remove(str(TESTS / "train"))
    return root


def _straight(tmp_path: Path, epochs: int) -> Path:
    run = tmp_path / f"straight{epochs}"
    pyro.clear_param_store()  # pyro.module would hand a fresh program the parameters of an earlier run
    train(TrainConfig.from_flat(dict(DELTA, epochs=epochs, run_dir=str(run))), program=delta())
    return run


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_reach_the_parameters_of_one(spawned, tmp_path):
    straight = _straight(tmp_path, 2)
    _assert_close(params(spawned / "two"), params(straight))
    for a, b in zip(metrics(spawned / "two"), metrics(straight)):
        assert a["step"] == b["step"]
        for key in ("train_loss", "valid_elbo", "valid_bound"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    state = load_checkpoint(spawned / "two" / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2


def test_a_rank_without_a_share_of_a_short_last_batch_steps_in_lockstep(spawned, tmp_path):
    """129 points in batches of 64: the last batch has one point, which rank 1 scores alone (rank 0
    has no gradient there); 3 validation points split 1 + 2."""
    pyro.clear_param_store()
    one = tmp_path / "one"
    train(TrainConfig.from_flat(dict(DELTA, epochs=2, run_dir=str(one))), program=delta(), dataset=digits_subset(*SHORT))
    _assert_close(params(spawned / "short"), params(one))
    for a, b in zip(metrics(spawned / "short"), metrics(one)):
        assert (a["step"], a["valid_elbo"]) == (b["step"], pytest.approx(b["valid_elbo"], rel=1e-6))


def test_the_ranks_pause_together_at_max_steps_and_go_on_as_one_run(spawned, tmp_path):
    state = load_checkpoint(spawned / "paused" / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"], state["world_size"]) == (0, 7, 7, 2)
    assert len(state["rank_rng"]) == 2 and run_status(spawned / "paused")["state"] == "paused"
    _assert_close(params(spawned / "in_pieces"), params(spawned / "two"))
    assert [r["step"] for r in metrics(spawned / "in_pieces")] == [r["step"] for r in metrics(spawned / "two")]


def test_checkpoints_continue_across_world_sizes(spawned, tmp_path):
    _assert_close(params(spawned / "from_one"), params(_straight(tmp_path, 2)))  # 1 -> 2
    assert [r["epoch"] for r in metrics(spawned / "from_one")] == [1, 2]
    pyro.clear_param_store()
    with pytest.warns(WorldSizeChangedWarning, match=r"written by a run of 2 process\(es\) and continues in 1"):
        train(TrainConfig.from_flat(dict(DELTA, epochs=3, run_dir=str(spawned / "two"))), program=delta(),
              resume=True)  # 2 -> 1
    _assert_close(params(spawned / "two"), params(_straight(tmp_path, 3)))
    assert load_checkpoint(spawned / "two" / "checkpoint.pt")["world_size"] == 1


# -- the built-in VAE through torchrun ------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """``torchrun`` of two ranks: the built-in VAE on the digits, uninterrupted."""
    root = tmp_path_factory.mktemp("torchrun")
    child = torchrun(["train", *VAE, "--epochs", str(VAE_EPOCHS), "--run-dir", str(root / "two")], root)
    out, err = finish(child)
    assert child.returncode == 0, err
    return root / "two", out, err


def test_the_run_directory_holds_one_set_of_files_written_by_rank_0(vae_run):
    run, out, err = vae_run
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "checkpoint.pt", "config.json",
                                                   "metrics.jsonl", "reconstructions.png", "samples.png",
                                                   "status.json"]
    assert [r["epoch"] for r in metrics(run)] == list(range(1, VAE_EPOCHS + 1))
    assert run_status(run)["state"] == "finished"
    assert out.count("run directory:") == 1 and "Traceback" not in err  # rank 0 reports, once
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["world_size"] == 2
    first, second = state["rank_rng"]
    assert torch.equal(first["torch"], state["rng"]["torch"])
    assert not torch.equal(first["torch"], second["torch"])  # each rank draws its own noise


def test_built_in_vae_losses_agree_with_one_process_statistically(vae_run, digits, tmp_path):
    run, _, _ = vae_run
    config = TrainConfig.from_flat(dict(epochs=VAE_EPOCHS, latent_dim=4, hidden=[32], batch_size=64, patience=0,
                                        device="cpu", progress=False, run_dir=str(tmp_path / "one")))
    one = train(config, dataset=digits).history
    two = metrics(run)
    assert two[-1]["valid_elbo"] > two[0]["valid_elbo"] + 5.0  # it trains
    for a, b in zip(two, one):  # seeds 0..2 of one process lie within 0.6 nats of each other here
        assert a["step"] == b["step"]
        assert abs(a["valid_elbo"] - b["valid_elbo"]) < 1.5 and abs(a["train_loss"] - b["train_loss"]) < 1.5


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60.0) -> int:
    """The pid of the launched worker with ``RANK=rank`` (a child of the torchrun process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").glob("*"):
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} appeared")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' pids through /proc (Linux)")
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_bit_for_bit(vae_run, tmp_path):
    straight, _, _ = vae_run
    run = tmp_path / "run"
    child = torchrun(["train", *VAE, "--epochs", str(VAE_EPOCHS), "--run-dir", str(run)], tmp_path)
    rank1 = _rank_pid(child, 1)
    wait_for_file(run / "checkpoint.pt", child)
    os.kill(rank1, signal.SIGTERM)
    out, err = finish(child)
    assert child.returncode != 0 and err.count("exitcode  : 143") == 2, err  # both ranks stopped by SIGTERM
    assert (out + err).count("SIGTERM: finishing this step") == 1  # only rank 1 received it
    assert out.count("SIGTERM: stopped and saved") == 1 and "Traceback" not in out
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] < VAE_EPOCHS * 22 and len(state["rank_rng"]) == 2
    status = run_status(run)
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM" and status["step"] == state["step"]
    resumed = torchrun(["train", "--resume", str(run), "--no-progress"], tmp_path)
    _, err = finish(resumed)
    assert resumed.returncode == 0, err
    a, b = params(run), params(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in metrics(run)] == list(range(1, VAE_EPOCHS + 1))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' pids through /proc (Linux)")
def test_a_rank_killed_mid_run_leaves_the_last_checkpoint_whole(tmp_path):
    run = tmp_path / "run"
    child = torchrun(["train", *VAE, "--epochs", "30", "--run-dir", str(run)], tmp_path)
    rank1 = _rank_pid(child, 1)
    wait_for_file(run / "checkpoint.pt", child)
    os.kill(rank1, signal.SIGKILL)
    out, err = finish(child)
    assert child.returncode != 0 and "pyro_vae/train/" not in out + err  # no traceback from the ranks
    state = load_checkpoint(run / "checkpoint.pt")  # complete and verified
    assert (state["batch"] == 0 or state["step"] % 5 == 0) and len(state["rank_rng"]) == 2
    assert not list(run.glob("*.tmp"))
    status = run_status(run)
    assert status["state"] in ("failed", "aborted"), status
    if status["state"] == "failed":
        assert "another process of this distributed run stopped, was killed" in status["error"]
