"""The built-in proofs that the core is open, through the command line: a user's part by
import path, the two-stochastic-layer VAE and the convolutional networks each train, resume,
evaluate and sample, with every objective that applies."""

from __future__ import annotations

import json

import pytest

from pyro_vae.cli.main import main
from pyro_vae.train.checkpoint import load_checkpoint

TINY = ["--epochs", "1", "--batch-size", "256", "--no-progress", "--patience", "0"]


def _train_evaluate_sample_resume(run, *flags, plots=False):
    assert main(["train", *flags, *TINY, "--run-dir", str(run)]) == 0
    assert main(["evaluate", str(run), "--particles", "40", "--num-points", "24", "--no-progress",
                 "--iwae-k", "1", "5", "--alphas", "0.5", *([] if plots else ["--no-plots"])]) == 0
    report = json.loads((run / "evaluation.json").read_text())
    assert main(["sample", str(run), "--num", "8"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    return report


def test_a_user_guide_by_import_path(tmp_path):
    report = _train_evaluate_sample_resume(tmp_path / "r", "--guide", "user_parts:SmallGuide", "--latent-dim", "3",
                                           plots=True)
    assert (tmp_path / "r" / "latent_traversals.png").is_file()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["guide"] == "user_parts:SmallGuide"
    params = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["program"]["params"]
    assert params["vae$$$encoder.net.0.weight"].shape == (24, 64)  # the user's own width
    assert report["results"]["latent"]["latent_dim"] == 3


@pytest.mark.parametrize("objective", ["trace", "iwae", "renyi"])
def test_two_stochastic_layers(tmp_path, objective):
    extra = {"trace": [], "iwae": ["--particles", "3"], "renyi": ["--alpha", "0.5", "--particles", "3"]}[objective]
    report = _train_evaluate_sample_resume(
        tmp_path / "r", "--stochastic-layers", "2", "--latent-dim", "6", "--top-latent-dim", "3", "--hidden", "32",
        "--top-hidden", "16", "--objective", objective, *extra)
    res = report["results"]
    assert set(res["latent_sites"]) == {"z1", "z2"} and set(res["kl_per_site"]) == {"z1", "z2"}
    assert res["log_likelihood"]["mean"] >= res["elbo"]["mean"] - 1e-6


def test_two_stochastic_layers_refuse_meanfield(tmp_path, capsys):
    assert main(["train", "--stochastic-layers", "2", "--objective", "meanfield", *TINY,
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "not mean-field" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["trace", "meanfield", "iwae"])
def test_convolutional_networks(tmp_path, objective):
    extra = ["--particles", "3"] if objective == "iwae" else []
    report = _train_evaluate_sample_resume(tmp_path / "r", "--network", "conv", "--latent-dim", "4",
                                           "--objective", objective, *extra)
    assert report["results"]["latent"]["latent_dim"] == 4
