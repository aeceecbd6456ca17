"""Real processes and real signals: ``pyro-vae train`` stopped by SIGTERM or killed by SIGKILL in the
middle of an epoch resumes to exactly the run it would have been, a running run's directory refuses
a second writer, and two runs started together never share a directory.

The trained program is ``tests/train/slow_program.py``, whose guide sleeps
``$SLOW_PROGRAM_DELAY`` seconds per training step in the child process, so the
signal lands inside the first epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_for_file

from pyro_vae.cli.main import main
from pyro_vae.train.checkpoint import load_checkpoint
from pyro_vae.train.rundir import is_locked, run_status

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
PROGRAM = ["--program", "slow_program:make", "--epochs", "2", "--batch-size", "128", "--no-progress"]


@pytest.fixture(autouse=True)
def slow_program_importable(monkeypatch, cpu_threads):
    monkeypatch.syspath_prepend(str(TESTS / "train"))
    monkeypatch.delenv("SLOW_PROGRAM_DELAY", raising=False)
    torch.set_num_threads(1)  # the same thread count as the child processes: the same arithmetic


def _env(delay: float) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS / "train"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "SLOW_PROGRAM_DELAY": str(delay), "OMP_NUM_THREADS": "1",
            "MPLBACKEND": "Agg"}


def _start(argv, cwd, delay=0.05) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyro_vae", *argv], cwd=cwd, env=_env(delay),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every stopped one must reproduce."""
    sys.path.insert(0, str(TESTS / "train"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("signals") / "straight"
        assert main(["train", *PROGRAM, "--run-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(TESTS / "train"))
    return load_checkpoint(run / "checkpoint.pt")["program"]["params"]


def _assert_resumes_to(run: Path, straight) -> None:
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    params = load_checkpoint(run / "checkpoint.pt")["program"]["params"]
    assert params.keys() == straight.keys()
    for name in params:
        assert torch.equal(params[name], straight[name]), name
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [int(r.split('"epoch": ')[1].split(",")[0]) for r in rows] == [1, 2]  # no duplicate, no torn row
    assert not list(run.glob("*.tmp"))


def test_sigterm_mid_epoch_saves_exits_143_and_resumes_exactly_while_the_lock_refuses_a_second_writer(
        tmp_path, straight, capsys):
    run = tmp_path / "run"
    child = _start(["train", *PROGRAM, "--checkpoint-every-steps", "3", "--run-dir", str(run)], tmp_path)
    wait_for_file(run / "checkpoint.pt", child)
    # A second writer while the first one trains: refused by name, for a new run and for --resume.
    for argv in (["train", *PROGRAM, "--run-dir", str(run)], ["train", "--resume", str(run), "--epochs", "3"]):
        assert main(argv) == 2
        assert f"is in use by another pyro-vae process (pid {child.pid}" in capsys.readouterr().err
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert f"continue with: pyro-vae train --resume {run}" in out and "Traceback" not in err
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 0 and state["batch"] >= 3  # saved inside the first epoch, where it stopped
    assert run_status(run)["state"] == "interrupted" and run_status(run)["signal"] == "SIGTERM"
    assert not is_locked(run)
    _assert_resumes_to(run, straight)


def test_sigkill_mid_epoch_loses_at_most_the_checkpoint_interval(tmp_path, straight):
    run = tmp_path / "run"
    child = _start(["train", *PROGRAM, "--checkpoint-every-steps", "2", "--run-dir", str(run)], tmp_path)
    wait_for_file(run / "checkpoint.pt", child)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    state = load_checkpoint(run / "checkpoint.pt")  # complete and verified: saves are atomic
    assert state["epoch"] == 0 and state["batch"] % 2 == 0 and state["batch"] >= 2
    assert run_status(run)["state"] == "killed"  # it said "training", but nobody holds the lock
    _assert_resumes_to(run, straight)


def test_two_trainings_started_in_the_same_second_get_their_own_run_directories(tmp_path):
    argv = ["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "512", "--no-progress"]
    children = [_start(argv, tmp_path, delay=0) for _ in range(2)]
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(run.name.startswith("digits-trace-") for run in runs)
    for run in runs:
        assert (run / "checkpoint.pt").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.6])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_the_command_imports_ends_it_in_one_line(signum, delay, tmp_path):
    # Python itself starts in tens of ms; the import of torch and Pyro takes a second or more, and
    # each delay lands the signal in another part of it
    child = _start(["train", "--epochs", "1", "--run-dir", str(tmp_path / "run")], tmp_path)
    time.sleep(delay)
    child.send_signal(signum)
    out, err = child.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert child.returncode == 128 + signum, (child.returncode, err)
    assert f"stopped by {signal.Signals(signum).name} while starting; nothing was written" in err
    assert not (tmp_path / "run").exists()


def test_the_quiet_start_is_for_the_command_line_only():
    from pyro_vae.cli import startup

    assert startup.is_command_line(["/venv/bin/pyro-vae", "train"]) and startup.is_command_line(["-m", "train"])
    assert not startup.is_command_line(["/usr/bin/pytest"]) and not startup.is_command_line(["-c"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # importing the library left it alone
    from pyro_vae.train.trainer import STOP_SIGNALS

    assert [s for s in startup.SIGNAL_NAMES if hasattr(signal, s)] == [signal.Signals(s).name for s in STOP_SIGNALS]


def test_after_the_command_the_stop_signals_meet_their_defaults(tmp_path):
    from pyro_vae.cli import startup

    startup.quiet_stops()
    try:
        main(["compare", str(tmp_path / "no-such-run")])  # any command, done or refused
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        startup.restore_defaults()


def test_a_stop_signal_whose_exception_was_lost_still_stops_training(tmp_path):
    run = tmp_path / "run"
    child = _start(["train", "--program", "swallowing_program:make", "--epochs", "2", "--no-progress",
                    "--run-dir", str(run)], tmp_path)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, (child.returncode, out, err)
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not (run / "checkpoint.pt").exists()  # stopped before the first step
