"""Bad inputs and faults as a demanding user meets them: every error is one line that names the
bad value, with exit status 2 (a bad input) or 1 (the machine refused, or an error nobody
foresaw, whose traceback is kept in a file); no damaged run hides the others."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pyro_vae.cli.main import main, one_line

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--particles", "2", "--batch-size", "512",
        "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", *FAST, "--run-dir", str(run)]) == 0
    assert main(["evaluate", str(run), "--particles", "4", "--num-points", "8", "--no-plots", "--no-progress"]) == 0
    return run


def _cli(argv, cwd, pythonpath=(), env=None):
    """``python -m pyro_vae ARGV`` in a real process: (exit status, stdout, stderr)."""
    path = os.pathsep.join([*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "pyro_vae", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line or "Traceback" in line or line.startswith(" ")]


# -- one line per error ------------------------------------------------------------------------------

def test_foreign_multi_line_messages_become_one_line():
    pyro_message = ("Error while computing log_prob at site 'x':\nExpected value argument (Tensor of shape (2, 3)) "
                    "to be within the support (Boolean()) of the distribution Bernoulli(), but found invalid "
                    "values:\ntensor([[0.5000, 0.0000],\n        [0.2500, 1.0000]])\nTrace Shapes:\n Param Sites:")
    assert one_line(pyro_message) == ("Error while computing log_prob at site 'x': Expected value argument (Tensor "
                                      "of shape (2, 3)) to be within the support (Boolean()) of the distribution "
                                      "Bernoulli(), but found invalid values")
    assert one_line("plain") == "plain"


def test_user_programs_that_raise_are_named_in_one_line_from_a_real_process(tmp_path):
    (tmp_path / "broken_programs.py").write_text(textwrap.dedent("""
        import pyro, pyro.distributions as dist, torch
        from torch import nn

        def model(x):
            raise RuntimeError("this model always fails")

        def guide(x):
            pass

        class NotBinary(nn.Module):  # a Bernoulli likelihood on grey levels: torch prints the tensor
            def __init__(self, input_dim):
                super().__init__()
                self.dec, self.enc = nn.Linear(2, input_dim), nn.Linear(input_dim, 4)

            def model(self, x):
                pyro.module("m", self)
                with pyro.plate("data", x.shape[0]):
                    z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.).to_event(1))
                    pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

            def guide(self, x):
                pyro.module("m", self)
                loc, s = self.enc(x).chunk(2, -1)
                with pyro.plate("data", x.shape[0]):
                    pyro.sample("z", dist.Normal(loc, s.exp()).to_event(1))
        """))
    for program, expected in (("broken_programs", "program broken_programs failed on its first run, on 2 points "
                                                  "of digits: RuntimeError: this model always fails"),
                              ("broken_programs:NotBinary", "to be within the support")):
        code, _, err = _cli(["train", *FAST, "--program", program, "--run-dir", str(tmp_path / "r")], tmp_path,
                            [tmp_path])
        assert code == 2, err
        assert expected in err and "Traceback" not in err and "tensor(" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()


def test_an_error_nobody_foresaw_is_one_line_with_the_traceback_kept(monkeypatch, capsys, tmp_path):
    def crash(args):
        return {}["missing key"]

    monkeypatch.setattr("pyro_vae.cli.compare.run", crash)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["compare", "anything"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("pyro-vae compare: error: unexpected KeyError: 'missing key' (at test_faults.py:")
    kept = Path(err.rsplit("the traceback is in ", 1)[1])
    assert kept.parent == tmp_path and "Traceback (most recent call last)" in kept.read_text()
    monkeypatch.setenv("PYRO_VAE_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(["compare", "anything"])


# -- compare shows every run it can -------------------------------------------------------------------

def test_compare_shows_every_run_whatever_the_damage_to_the_others(run, tmp_path, capsys):
    evaluation = json.loads((run / "evaluation.json").read_text())
    damaged = {
        "not_utf8": b"\xff\xfe{",
        "a_list": b"[]",
        "a_string": b'"text"',
        "odd_checkpoint": json.dumps({**evaluation, "checkpoint": {"file": 5}}).encode(),
        "odd_config": json.dumps({**evaluation, "config": [1]}).encode(),
        "no_latent": json.dumps({**evaluation, "results": {**evaluation["results"], "latent": None}}).encode(),
    }
    dirs = []
    for name, content in damaged.items():
        shutil.copytree(run, tmp_path / name)
        (tmp_path / name / "evaluation.json").write_bytes(content)
        dirs.append(str(tmp_path / name))
    (tmp_path / "odd_config" / "status.json").write_text('{"state": 5, "epoch": [1]}')
    assert main(["compare", str(run), *dirs]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert " ± " in rows[str(run)]  # the good run keeps its numbers
    assert "not valid JSON" in rows[dirs[0]] and "holds a JSON list" in rows[dirs[1]]
    assert "holds a JSON str" in rows[dirs[2]]
    assert " ± " in rows[dirs[3]]  # an unreadable checkpoint record is not judged; the numbers stay
    assert "lacks an expected entry" in rows[dirs[4]] and "lacks an expected entry" in rows[dirs[5]]


# -- a user's part is held to the protocol when it is built -------------------------------------------

def test_a_decoder_that_does_not_broadcast_particles_is_named_when_built(tmp_path, monkeypatch, capsys):
    (tmp_path / "flat_decoders.py").write_text(textwrap.dedent("""
        import pyro.distributions as dist
        from torch import nn

        class FlatOnly(nn.Module):  # reshapes z to (batch, latent): the particle dimension is lost
            def __init__(self, latent_dim, input_dim):
                super().__init__()
                self.layer = nn.Linear(latent_dim, input_dim)

            def forward(self, z, y=None):
                return dist.Bernoulli(logits=self.layer(z.reshape(z.shape[0], -1)[:, :self.layer.in_features])
                                      ).to_event(1)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", *FAST, "--decoder", "flat_decoders:FlatOnly", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--decoder 'flat_decoders:FlatOnly': forward(z, y) on z of shape (2, 3) + latent returned a " \
           "distribution with batch shape (2,); expected (2, 3), a decoder must broadcast a leading particle" in err
    assert not (tmp_path / "r").exists()


# -- the Python API names its bad arguments -------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"alphas": [float("nan")]}, "alphas must be finite numbers, got [nan]"),
    ({"seed": -1}, "seed must be an integer in [0, 4294967295], got -1"),
    ({"posterior_samples": 0}, "posterior_samples must be a positive integer, got 0"),
    ({"particles": 5.5}, "particles must be a positive integer, got 5.5"),
    ({"max_memory_mb": float("inf")}, "max_memory_mb must be a positive finite number, got inf"),
    ({"export_indices": [-1]}, "export_indices must be test-point indices >= 0, got [-1]"),
    ({"iwae_ks": "5"}, "iwae_ks must be positive integers, got '5'"),
])
def test_evaluate_refuses_bad_arguments_by_name_before_opening_the_run(monkeypatch, change, message):
    import numpy as np

    from pyro_vae.evaluation.run import evaluate

    monkeypatch.setattr("pyro_vae.evaluation.run.load_run", lambda *a, **k: pytest.fail("opened the run"))
    with pytest.raises(ValueError) as e:
        evaluate("any run", **{"particles": np.int64(4), **change})
    assert message in str(e.value)


def test_evaluate_takes_numpy_integers(run, tmp_path):
    import numpy as np

    from pyro_vae.evaluation.run import evaluate

    report = evaluate(run, np.int64(4), num_points=np.int32(5), iwae_ks=[np.int64(2)], seed=np.uint8(3),
                      plots_=False, out_dir=tmp_path)
    assert report["results"]["num_points"] == 5 and report["num_particles"] == 4


def test_train_refuses_a_config_or_data_set_of_the_wrong_kind(tmp_path):
    from pyro_vae import TrainConfig, train

    with pytest.raises(TypeError, match="config must be a TrainConfig, got str"):
        train("epochs=1")
    with pytest.raises(TypeError, match=r"dataset must be a pyro_vae.data.Dataset \(or None, to load config.data\), "
                                        "got str 'digits'"):
        train(TrainConfig(epochs=1, progress=False, run_dir=str(tmp_path / "r")), dataset="digits")
    assert not (tmp_path / "r").exists()


# -- every stop signal unwinds, outside the training loop too --------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGXCPU])
def test_a_scheduler_signal_before_training_unwinds_and_leaves_no_run_dir(tmp_path, signum):
    """SIGUSR1/2 and SIGXCPU stop training with a checkpoint; before the loop (here: while the
    program is built) they must unwind the same way, not kill the process with a half-made run."""
    (tmp_path / "slow_factory.py").write_text(textwrap.dedent(f"""
        import pathlib, time

        def make():
            pathlib.Path({str(tmp_path / 'building')!r}).touch()
            time.sleep(60)
        """))
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, "-m", "pyro_vae", "train", *FAST, "--program", "slow_factory:make",
                              "--run-dir", str(tmp_path / "r")], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (tmp_path / "building").exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.02)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signum, err
    assert err.strip() == f"pyro-vae train: stopped by {signal.Signals(signum).name}; nothing half-written was left"
    assert not (tmp_path / "r").exists()


# -- values as a user types them ------------------------------------------------------------------------

def test_negative_numbers_in_scientific_notation_are_values_not_options(capsys):
    from pyro_vae.cli.main import build_parser

    args = build_parser().parse_args(["train", "--objective", "renyi", "--alpha", "-1e-3", "--temperature", "-2E2"])
    assert args.alpha == -1e-3 and args.temperature == -200.0
    assert build_parser().parse_args(["evaluate", "run", "--alphas", "-1e-1", "0.5"]).alphas == [-0.1, 0.5]
    for flags, message in ((["--lr", "-1e-3"], "argument --lr: expected a positive finite number, got -1e-3"),
                           (["--alpha", "-inf"], "argument --alpha: expected a finite number, got -inf")):
        with pytest.raises(SystemExit):
            main(["train", *flags])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags,cause", [
    (["--objective", "renyi", "--alpha", "1e300"], "Likely cause: alpha = 1e+300 is extreme"),
    (["--prior", "categorical", "--guide", "categorical", "--temperature", "1e300"],
     "Likely cause: temperature = 1e+300 is extreme"),
])
def test_a_divergence_from_an_extreme_option_names_it(tmp_path, capsys, flags, cause):
    assert main(["train", *FAST, *flags, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "at the first step" in err and cause in err and "No checkpoint was written" in err


def test_a_data_folder_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "data").write_text("not a folder")
    assert main(["train", *FAST, "--data", "mnist", "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert f"the data folder {tmp_path / 'data'} is a file" in capsys.readouterr().err
