"""A user's own model/guide pair goes through everything the built-in VAE does:
train, resume bit for bit, evaluate (every bound, KL per site), sample, from Python and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_vae import TrainConfig, evaluate, load_run, train
from pyro_vae.cli.main import main
from pyro_vae.evaluation import arviz_compat
from pyro_vae.evaluation.pictures import write_run_pictures
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint

import user_programs

FAST = dict(data="digits", batch_size=128, progress=False, patience=0)


def _params(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["program"]["params"]


@pytest.mark.parametrize("objective,extra", [("trace", {}), ("iwae", {"particles": 3})])
def test_two_site_program_resumes_bit_for_bit(tmp_path, digits, objective, extra):
    cfg = TrainConfig.from_flat(dict(epochs=2, objective=objective, **extra, **FAST))
    train(cfg.replace(run_dir=str(tmp_path / "straight")), program=user_programs.two_site_program(), dataset=digits)
    program = user_programs.two_site_program()
    first = cfg.replace(epochs=1, run_dir=str(tmp_path / "split"))
    train(first, program=program, dataset=digits)
    fresh = user_programs.two_site_program(seed=5)  # other initial values: the checkpoint must replace them
    train(cfg.replace(run_dir=str(tmp_path / "split")), program=fresh, dataset=digits, resume=True)
    straight, split = _params(tmp_path / "straight"), _params(tmp_path / "split")
    assert set(straight) == {"enc$$$0.weight", "enc$$$0.bias", "enc$$$2.weight", "enc$$$2.bias", "dec$$$0.weight",
                             "dec$$$0.bias", "dec$$$2.weight", "dec$$$2.bias", "top_enc$$$weight",
                             "top_enc$$$bias", "top_dec$$$weight", "top_dec$$$bias"}
    for name in straight:
        assert torch.equal(straight[name], split[name]), name


def test_two_site_program_is_evaluated_with_every_bound_and_kl_per_site(tmp_path, digits):
    program = user_programs.two_site_program()
    result = train(TrainConfig.from_flat(dict(epochs=2, run_dir=str(tmp_path), **FAST)), program=program,
                   dataset=digits)
    assert result.history[-1]["valid_elbo"] > result.history[0]["valid_elbo"] - 1.0
    with pytest.raises(CheckpointError, match="pass the same pair"):
        load_run(tmp_path)
    report = evaluate(tmp_path, 120, num_points=40, program=program, export_indices=[0, 3], posterior_samples=30)
    res = report["results"]
    assert res["log_likelihood"]["mean"] >= res["elbo"]["mean"] - 1e-6
    assert set(res["latent_sites"]) == {"local", "style"}
    assert set(res["kl_per_site"]) == {"local", "style"}
    kl_sites = res["kl_per_site"]["local"]["mean"] + res["kl_per_site"]["style"]["mean"]
    assert kl_sites == pytest.approx(res["kl"]["mean"], rel=1e-6)
    assert res["latent"]["site"] == "local"  # the first site the guide samples
    assert {"samples", "reconstructions", "latent_map", "latent_traversals"} <= set(report["pictures"])
    posterior = arviz_compat.load_netcdf(tmp_path / "posterior.nc")
    assert posterior.posterior["local"].shape == (1, 30, 2, 3)
    assert posterior.posterior["style"].shape == (1, 30, 2, 2)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["results"]["log_likelihood"]["mean"] == pytest.approx(res["log_likelihood"]["mean"])


def test_param_store_program_trains_resumes_and_samples(tmp_path, digits):
    cfg = TrainConfig.from_flat(dict(epochs=1, run_dir=str(tmp_path), **FAST))
    program = user_programs.param_program()
    train(cfg, program=program, dataset=digits)
    before = _params(tmp_path)
    assert set(before) == {"w", "b", "a", "s"}
    train(cfg.replace(epochs=2), program=user_programs.param_program(), dataset=digits, resume=True)
    after = _params(tmp_path)
    assert not torch.equal(before["w"], after["w"])
    paths = write_run_pictures(tmp_path, program=user_programs.param_program(), num=16)
    assert all(p.is_file() for p in paths)


def test_a_program_by_import_path_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--program", "user_programs", "--epochs", "1", "--batch-size", "256", "--no-progress",
                 "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["program"] == "user_programs"
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["evaluate", str(run), "--particles", "50", "--num-points", "30", "--no-progress"]) == 0
    assert "log p(x)" in capsys.readouterr().out
    assert main(["sample", str(run), "--num", "9"]) == 0
    assert (run / "samples.png").is_file()


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz", "cannot import module 'no_such_module_xyz'"),
    ("user_programs:missing", "has no attribute 'missing'"),
    ("json", "has no top-level `model` and `guide`"),
    ("user_programs:DIGITS", "neither a model/guide pair nor callable"),
])
def test_bad_program_paths_are_named(tmp_path, capsys, path, message):
    assert main(["train", "--program", path, "--epochs", "1", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and path in err


def _networks(program):
    """The nn.Modules a plain-function program closes over."""
    model, guide = program
    cells = [*(model.__closure__ or ()), *(guide.__closure__ or ())]
    return [c.cell_contents for c in cells if isinstance(c.cell_contents, torch.nn.Module)]


def test_a_second_program_of_the_same_names_trains_its_own_networks_not_the_store_of_the_first(tmp_path, digits):
    """pyro.module returns the parameter store's tensors when names repeat: a second program in the
    same process must still train (and checkpoint) the tensors its networks use."""
    cfg = TrainConfig.from_flat(dict(epochs=1, **FAST))
    train(cfg.replace(run_dir=str(tmp_path / "first")), program=user_programs.two_site_program(), dataset=digits)
    second = user_programs.two_site_program(seed=3)
    before = [p.detach().clone() for net in _networks(second) for p in net.parameters()]
    with pytest.warns(UserWarning, match="parameter store held parameters of the same names"):
        train(cfg.replace(run_dir=str(tmp_path / "second")), program=second, dataset=digits)
    after = [p.detach() for net in _networks(second) for p in net.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # every tensor was trained
    saved = _params(tmp_path / "second")
    used = {id(p): p for net in _networks(second) for p in net.parameters()}
    assert len(saved) == len(used)
    for tensor in saved.values():  # the checkpoint holds the trained networks' values
        assert any(torch.equal(tensor, p.detach()) for p in used.values())
