"""The gradient SNR tool: parameter groups, the papers' SNR orderings on the linear-Gaussian pair,
and ``pyro-vae snr`` on a tiny digits run."""

import json
import math

import pyro
import pytest
import torch
from linear_gaussian import LinearGaussianProblem
from linear_gaussian_pair import LinearGaussianPair

import pyro_vae.evaluation.pictures as pictures
from pyro_vae.cli.main import main
from pyro_vae.evaluation.snr import (GUIDE, MODEL, SHARED, gradient_snr, parameter_groups, snr_sweep,
                                     split_groups)
from pyro_vae.infer.objectives import make_elbo
from pyro_vae.models.registry import build_vae
from pyro_vae.train.config import TrainConfig

PROBLEM = LinearGaussianProblem(n=8, seed=0)


@pytest.fixture(autouse=True)
def one_thread_fresh_store():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    torch.set_num_threads(threads)


def snr(results, objective, k, group):
    return next(r.snr[group].mean for r in results if r.objective == objective and r.particles == k)


def test_parameter_groups_follow_the_densities_not_the_param_sites():
    """The built-in VAE registers its whole module in both programs; the groups still split
    encoder from decoder, and a VampPrior's encoder, read by the prior too, is shared."""
    pyro.set_rng_seed(0)
    x = torch.rand(6, 10).round()
    vae = build_vae(TrainConfig.from_flat(dict(latent_dim=2, hidden=[8])), 10)
    groups = parameter_groups(vae.model, vae.guide, x)
    assert set(groups) == {GUIDE, MODEL}
    assert {id(p) for p in groups[GUIDE].values()} == {id(p) for p in vae.encoder.parameters()}
    assert {id(p) for p in groups[MODEL].values()} == {id(p) for p in vae.decoder.parameters()}
    pyro.clear_param_store()
    vamp = build_vae(TrainConfig.from_flat(dict(latent_dim=2, hidden=[8], prior="vamp", pseudo_inputs=3)), 10)
    groups = parameter_groups(vamp.model, vamp.guide, x)
    assert {id(p) for p in groups[SHARED].values()} == {id(p) for p in vamp.encoder.parameters()}
    assert {id(p) for p in groups[MODEL].values()} == {id(p) for p in (*vamp.decoder.parameters(),
                                                                        *vamp.prior.parameters())}
    assert not groups[GUIDE]
    pair = LinearGaussianPair(PROBLEM)
    groups = parameter_groups(pair.model, pair.guide, PROBLEM.x)
    assert [list(g.values()) for g in (groups[GUIDE], groups[MODEL])] == [pair.phi, pair.theta]


def test_iwae_guide_snr_falls_with_k_while_dregs_rises_and_tighter_objectives_keep_it():
    """Rainforth et al. 2018: the IWAE guide SNR falls with K while the model's rises; MIWAE and
    PIWAE at the same total draws keep the guide's higher.  Tucker et al. 2018: DReG's does not fall."""
    pair = LinearGaussianPair(PROBLEM, shift=0.2, narrow=1.2)
    results = snr_sweep(pair.model, pair.guide, PROBLEM.x, objectives=["iwae", "iwae-dreg"], particles=[1, 64],
                        draws=100, progress=False)
    results += snr_sweep(pair.model, pair.guide, PROBLEM.x, objectives=["miwae", "piwae"], particles=[64], draws=100,
                         progress=False)
    assert snr(results, "iwae", 64, GUIDE) < 0.3 * snr(results, "iwae", 1, GUIDE)
    assert snr(results, "iwae", 64, MODEL) > 2 * snr(results, "iwae", 1, MODEL)
    assert snr(results, "iwae-dreg", 64, GUIDE) > snr(results, "iwae-dreg", 1, GUIDE)
    assert snr(results, "iwae-dreg", 64, MODEL) == snr(results, "iwae", 64, MODEL)  # the same model gradient
    for name in ("miwae", "piwae"):
        assert next(r.groups for r in results if r.objective == name) == 8  # 8 groups of 8
        assert snr(results, name, 64, GUIDE) > 5 * snr(results, "iwae", 64, GUIDE)
    assert snr(results, "piwae", 64, MODEL) == snr(results, "iwae", 64, MODEL)


def test_gradient_snr_leaves_no_trace_and_counts_constant_elements():
    pair = LinearGaussianPair(PROBLEM)  # the exact posterior: trace's guide gradient still varies
    start = torch.get_rng_state()
    result = gradient_snr(make_elbo("trace"), pair.model, pair.guide, PROBLEM.x, draws=5)
    assert torch.equal(torch.get_rng_state(), start)
    assert all(p.grad is None for p in pair.parameters())
    assert result[GUIDE].elements + result[GUIDE].excluded == sum(p.numel() for p in pair.phi)
    assert result[GUIDE].excluded == 0 and math.isfinite(result[GUIDE].median)
    with pytest.raises(ValueError, match=r"draws must be an integer >= 2 .*, got 1"):
        gradient_snr(make_elbo("trace"), pair.model, pair.guide, PROBLEM.x, draws=1)


def test_split_groups_is_square_by_default_and_must_divide_k():
    assert [split_groups("miwae", k) for k in (1, 5, 16, 50, 64)] == [1, 1, 4, 5, 8]
    assert split_groups("iwae", 64) is None and split_groups("piwae", 12, 3) == 3
    with pytest.raises(ValueError, match="K=10 draws per point into groups=4"):
        split_groups("piwae", 10, 4)


def test_snr_command_writes_json_table_and_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pictures, "write_run_pictures", lambda run_dir: [])  # pictures are tested elsewhere
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "512",
                 "--no-progress", "--run-dir", str(run)]) == 0
    out = tmp_path / "snr"
    assert main(["snr", str(run), "--objectives", "iwae,iwae-dreg,piwae", "--particles", "1,4", "--draws", "4",
                 "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "snr.json").read_text())
    assert report["batch_size"] == 8 and report["draws"] == 4
    rows = {(r["objective"], r["particles"]): r for r in report["results"]}
    assert set(rows) == {(o, k) for o in ("iwae", "iwae-dreg", "piwae") for k in (1, 4)}
    assert rows[("piwae", 4)]["groups"] == 2
    for row in rows.values():
        for group in (GUIDE, MODEL):
            assert row["snr"][group]["mean"] > 0 and row["snr"][group]["elements"] > 0
    table = (out / "snr.md").read_text()
    assert table.count("\n| iwae-dreg | ") == 2 and "| piwae | 4 | 2 x 2 |" in table
    assert (out / "snr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    assert main(["snr", str(run), "--objectives", "miwae", "--particles", "6", "--groups", "4", "--out",
                 str(out)]) == 2
    assert "K=6 draws per point into groups=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["snr", str(run), "--objectives", "iwae,elbo"])
    assert "unknown objective 'elbo'" in capsys.readouterr().err


def test_snr_refuses_an_output_it_cannot_write_before_drawing_and_shows_the_numbers_first(tmp_path, monkeypatch,
                                                                                            capsys):
    import pyro_vae.evaluation.snr as snr_module

    monkeypatch.setattr(pictures, "write_run_pictures", lambda run_dir: [])
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "512",
                 "--no-progress", "--run-dir", str(run)]) == 0
    swept = []
    real_sweep = snr_module.snr_sweep
    monkeypatch.setattr(snr_module, "snr_sweep", lambda *a, **k: swept.append(1) or real_sweep(*a, **k))
    (tmp_path / "a-file").write_text("x")
    capsys.readouterr()
    assert main(["snr", str(run), "--objectives", "trace", "--particles", "1", "--draws", "2", "--out",
                 str(tmp_path / "a-file"), "--no-progress"]) == 2
    assert f"cannot write into {tmp_path / 'a-file'}" in capsys.readouterr().err and not swept
    out = tmp_path / "snr"
    out.mkdir()
    (out / "snr.json").mkdir()  # the folder is writable, the report is not
    assert main(["snr", str(run), "--objectives", "trace", "--particles", "1", "--draws", "2", "--out", str(out),
                 "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "| trace |" in captured.out and str(out / "snr.json") in captured.err
