"""The command line as a user meets it, and every bad input it must refuse clearly."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_vae.cli.main import main
from pyro_vae.models.decoders import DataDomainError
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.trainer import Trainer

FAST = ["--epochs", "2", "--latent-dim", "3", "--hidden", "16", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *FAST, "--run-dir", str(run)]) == 0
    return run


def test_train_writes_metrics_checkpoints_pictures_and_says_where(trained_run, capsys):
    for name in ("metrics.jsonl", "checkpoint.pt", "best.pt", "config.json", "samples.png",
                 "reconstructions.png"):
        assert (trained_run / name).is_file(), name
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((trained_run / "config.json").read_text())["model"]["latent_dim"] == 3
    assert (trained_run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_and_sample_commands(trained_run, capsys, tmp_path):
    assert main(["evaluate", str(trained_run), "--particles", "10"]) == 0
    out = capsys.readouterr().out
    assert "digits test set" in out
    report = json.loads((trained_run / "evaluation.json").read_text())
    assert report["test_set"]["name"] == "digits"
    assert main(["sample", str(trained_run), "--out", str(tmp_path), "--num", "20"]) == 0
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "reconstructions.png").is_file()


def test_toml_config_is_read_and_flags_override_it(tmp_path):
    cfg = tmp_path / "vae.toml"
    cfg.write_text('[train]\nepochs = 1\nlatent_dim = 5\nhidden = [12]\nobjective = "iwae"\nparticles = 2\n'
                   'progress = false\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--latent-dim", "2", "--run-dir", str(run)]) == 0
    saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text())).to_flat()
    assert (saved["epochs"], saved["latent_dim"], saved["hidden"], saved["objective"]) == (1, 2, [12], "iwae")


def test_resume_from_the_cli_continues_to_more_epochs(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("argv,message", [
    (["train", "--objective", "elbo"], "invalid choice: 'elbo' (choose from"),
    (["train", "--decoder", "poisson"], "unknown decoder 'poisson'"),
    (["train", "--epochs", "0"], "expected a positive integer, got 0"),
])
def test_bad_flags_are_refused_with_the_valid_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "--objective" in argv:
        assert all(name in err for name in ("trace", "meanfield", "renyi", "iwae"))


def _error(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_data_set_lists_the_valid_names(capsys, tmp_path):
    err = _error(["train", "--data", "cifar", "--run-dir", str(tmp_path / "r")], capsys)
    assert "cifar" in err and "binarized-mnist" in err and "digits" in err


def test_renyi_without_alpha_and_with_alpha_one(capsys, tmp_path):
    assert "needs alpha" in _error(["train", "--objective", "renyi", "--run-dir", str(tmp_path / "a")], capsys)
    assert "alpha=1" in _error(["train", "--objective", "renyi", "--alpha", "1", "--run-dir",
                                str(tmp_path / "b")], capsys)


def test_data_with_nan_or_inf_is_refused(tmp_path, capsys):
    x = np.random.default_rng(0).random((50, 6)).astype(np.float32)
    x[3, 2] = np.nan
    x[7, 1] = np.inf
    np.save(tmp_path / "bad.npy", x)
    err = _error(["train", "--data", str(tmp_path / "bad.npy"), "--run-dir", str(tmp_path / "r")], capsys)
    assert "NaN" in err or "nan" in err


def test_values_outside_unit_interval_are_refused_by_the_bernoulli_decoder(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(60, 6)).astype(np.float32)
    np.save(tmp_path / "real.npy", x)
    err = _error(["train", "--data", str(tmp_path / "real.npy"), "--run-dir", str(tmp_path / "r")], capsys)
    assert "Bernoulli decoder needs values in [0, 1]" in err
    # the Gaussian decoder takes the same data
    assert main(["train", "--data", str(tmp_path / "real.npy"), "--decoder", "gaussian", *FAST,
                 "--run-dir", str(tmp_path / "g")]) == 0


def test_bernoulli_domain_error_from_python_names_the_range():
    from pyro_vae.models.decoders import BernoulliDecoder

    with pytest.raises(DataDomainError, match=r"values in \[-1, 2\]"):
        BernoulliDecoder(2, 3).check_data(torch.tensor([[-1.0, 0.5, 2.0]]))


def test_wrong_feature_size_for_a_checkpoint(trained_run, tmp_path, capsys):
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).random((40, 10)).astype(np.float32))
    state = load_checkpoint(trained_run / "best.pt")
    state["config"]["data"] = str(tmp_path / "wide.npy")
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, run / "best.pt")
    err = _error(["evaluate", str(run)], capsys)
    assert "expects 64 features per data point but" in err and "has 10" in err


def test_corrupt_foreign_and_unsafe_checkpoints_are_refused(tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "best.pt").write_bytes(b"\x00garbage" * 100)
    assert "not a readable checkpoint" in _error(["evaluate", str(tmp_path / "corrupt")], capsys)

    (tmp_path / "foreign").mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign" / "best.pt")
    assert "not a pyro-vae checkpoint" in _error(["evaluate", str(tmp_path / "foreign")], capsys)

    class Payload:  # arbitrary objects would run code on load: weights_only refuses them
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "unsafe").mkdir()
    with open(tmp_path / "unsafe" / "best.pt", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "unsafe" / "best.pt")

    assert "does not exist" in _error(["evaluate", str(tmp_path / "nowhere")], capsys)


def test_checksum_mismatch_is_reported_from_the_cli(tmp_path, capsys):
    import gzip

    folder = tmp_path / "binarized-mnist"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        with gzip.open(folder / f"binarized_mnist_{split}.amat.gz", "wt") as f:
            f.write(" ".join(["0"] * 784) + "\n")
    err = _error(["train", "--data", "binarized-mnist", "--data-dir", str(tmp_path), "--run-dir",
                  str(tmp_path / "r")], capsys)
    assert "md5" in err and "binarized_mnist_" in err


def test_nan_loss_during_training_is_a_clear_error_from_the_cli(tmp_path, capsys, monkeypatch):
    def nan_loss(self, *args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr("pyro.infer.Trace_ELBO.differentiable_loss", nan_loss)
    err = _error(["train", *FAST, "--run-dir", str(tmp_path / "r")], capsys)
    assert "loss became nan at step 1 (epoch 1, batch 1)" in err


def test_bad_device_and_config_values(tmp_path):
    with pytest.raises(ValueError, match="device must be"):
        TrainConfig.from_flat(dict(device="tpu")).validate()
    with pytest.raises(ValueError, match="unknown config key.*latent_size"):
        TrainConfig.from_dict({"latent_size": 3})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(TrainConfig.from_flat(dict(device="cuda", run_dir=str(tmp_path))))


def test_module_entry_point_and_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--objective" in out and "--warmup-epochs" in out and "--resume" in out
