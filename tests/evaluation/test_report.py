"""``pyro-vae evaluate`` and ``pyro-vae compare`` end to end on a tiny digits run
(pyro_vae.cli.evaluate, pyro_vae.evaluation.report, pyro_vae.evaluation.plots)."""

from __future__ import annotations

import json
import shutil

import pyro
import pytest

from pyro_vae.cli.main import main
from pyro_vae.evaluation import arviz_compat
from pyro_vae.evaluation.evaluator import EvaluationOptions, evaluate_test_set
from pyro_vae.evaluation.report import (
    EvaluationMissing,
    compare_rows,
    fmt_estimate,
    format_table,
    jsonable,
    load_evaluation,
)
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.runs import load_run
from pyro_vae.train.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALUATE = ["--particles", "200", "--num-points", "60", "--seed", "3", "--no-progress"]


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A 2-epoch digits run, evaluated through the command line."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    pyro.clear_param_store()
    train(TrainConfig.from_flat(dict(epochs=2, latent_dim=3, hidden=[32], batch_size=256, run_dir=str(run_dir), progress=False)))
    code = main(["evaluate", str(run_dir), *EVALUATE, "--export-posterior", "0", "7", "--posterior-samples", "40"])
    assert code == 0
    return run_dir


def test_report_files_exist_parse_and_hold_the_numbers_the_api_returns(evaluated_run):
    report = _strict_json(evaluated_run / "evaluation.json")
    results = report["results"]
    assert report["seed"] == 3 and results["num_particles"] == 200 and results["num_points"] == 60
    assert report["test_set"] == {"name": "digits", "split": "test", "num_points": 60, "subset": True}
    assert set(report["versions"]) >= {"torch", "pyro-ppl", "arviz", "python", "pyro_vae"}
    # Recompute through the API with the same seed: the same numbers.
    run = load_run(evaluated_run, "cpu")
    x = run.load_data().test[:60]
    pyro.set_rng_seed(3)
    again = evaluate_test_set(run.program, x, options=EvaluationOptions(num_particles=200)).summary()
    for key in ("log_likelihood", "elbo", "elbo_analytic_kl", "reconstruction", "kl", "gap"):
        assert results[key]["mean"] == pytest.approx(again[key]["mean"], abs=1e-9), key
        assert results[key]["stderr"] == pytest.approx(again[key]["stderr"], abs=1e-9), key
    assert results["iwae"]["50"]["mean"] == pytest.approx(again["iwae"]["50"]["mean"], abs=1e-9)
    assert results["renyi"]["0.5"]["mean"] == pytest.approx(again["renyi"]["0.5"]["mean"], abs=1e-9)
    assert results["latent"]["active_units"] == again["latent"]["active_units"]
    assert results["psis"]["fraction_above_0.7"] == pytest.approx(again["psis"]["fraction_above_0.7"])
    assert results["log_likelihood"]["mean"] >= results["elbo"]["mean"]
    # The markdown report quotes the same figures and embeds every picture.
    markdown = (evaluated_run / "evaluation.md").read_text()
    assert fmt_estimate(results["log_likelihood"]) in markdown
    assert fmt_estimate(results["gap"]) in markdown
    assert f"**{results['latent']['active_units']} of 3**" in markdown
    for name in ("latent_map", "latent_traversals", "training_curves", "khat_histogram", "samples",
                 "reconstructions"):
        path = evaluated_run / f"{name}.png"
        assert report["pictures"][name] == str(path)
        assert f"]({name}.png)" in markdown
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_posterior_export_from_the_command_line(evaluated_run):
    report = _strict_json(evaluated_run / "evaluation.json")
    assert report["posterior_export"]["indices"] == [0, 7]
    data = arviz_compat.load_netcdf(report["posterior_export"]["path"])
    assert data.posterior["z"].shape == (1, 40, 2, 3)
    assert "posterior.nc" in (evaluated_run / "evaluation.md").read_text()


def test_compare_prints_runs_side_by_side(evaluated_run, tmp_path, capsys):
    other = tmp_path / "copy"
    shutil.copytree(evaluated_run, other)
    report = json.loads((other / "evaluation.json").read_text())
    report["results"]["log_likelihood"]["mean"] = -12.3456
    report["config"]["objective"] = "iwae"
    (other / "evaluation.json").write_text(json.dumps(report))
    assert main(["compare", str(evaluated_run), str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("run") and set(lines[1]) <= {"-", " "}
    assert str(evaluated_run) in lines[2] and "trace" in lines[2]
    assert str(other) in lines[3] and "iwae" in lines[3] and "-12.35 ±" in lines[3]
    # Columns line up: numbers are right-aligned under their header.
    end = lines[0].index("ELBO") + len("ELBO")
    assert lines[2][:end].split()[-1] == f"{report['results']['elbo']['mean']:.2f}"
    assert lines[3][:end].split()[-1] == f"{report['results']['elbo']['mean']:.2f}"
    assert len(lines[0]) == len(lines[1])


def test_compare_shows_every_run_it_can_and_says_why_the_others_have_no_numbers(evaluated_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "evaluation.json").write_text("{not json")
    assert main(["compare", str(evaluated_run), str(bare), str(broken), str(tmp_path / "nowhere")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].rstrip().endswith("note")
    assert str(evaluated_run) in lines[2] and "-" not in lines[2].split()[5]
    assert str(bare) in lines[3] and f"run `pyro-vae evaluate {bare}` first" in lines[3]
    assert str(broken) in lines[4] and "not valid JSON" in lines[4]
    assert "no such run directory" in lines[5]
    assert main(["compare", str(bare)]) == 2  # nothing to compare at all
    assert "none of the runs has an evaluation" in capsys.readouterr().err
    with pytest.raises(EvaluationMissing, match=f"run `pyro-vae evaluate {bare}` first"):
        load_evaluation(bare)


def test_compare_marks_stale_evaluations_and_unfinished_training(evaluated_run, tmp_path, capsys):
    from pyro_vae.train.checkpoint import load_checkpoint, save_checkpoint
    from pyro_vae.train.rundir import write_status

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    assert compare_rows([run])[0]["note"] == ""  # a copy keeps its evaluation fresh
    state = load_checkpoint(run / "best.pt")
    state["epoch"] += 1  # the checkpoint changes after the evaluation
    save_checkpoint(state, run / "best.pt")
    write_status(run, "training", epoch=1, epochs=5)  # says training, but no process holds the lock
    assert main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "incomplete: killed at epoch 1/5" in out and "stale: the checkpoint changed" in out


def test_no_plots_writes_the_report_without_pictures(evaluated_run, tmp_path):
    run_dir = tmp_path / "noplots"
    shutil.copytree(evaluated_run, run_dir)
    for png in run_dir.glob("*.png"):
        png.unlink()
    assert main(["evaluate", str(run_dir), "--particles", "20", "--num-points", "10", "--no-plots",
                 "--no-progress"]) == 0
    assert not list(run_dir.glob("*.png"))
    report = _strict_json(run_dir / "evaluation.json")
    assert report["pictures"] == {} and report["results"]["psis"].startswith("n/a")
    assert "## Pictures" not in (run_dir / "evaluation.md").read_text()


def test_evaluate_rejects_out_of_range_export_indices(evaluated_run, capsys):
    code = main(["evaluate", str(evaluated_run), "--particles", "5", "--num-points", "10", "--no-plots",
                 "--no-progress", "--export-posterior", "3", "10"])
    assert code == 2
    assert "--export-posterior indices [10] are out of range: evaluating 10 test points" in capsys.readouterr().err


def test_jsonable_and_table_helpers():
    assert jsonable({"a": float("inf"), "b": [float("-inf"), float("nan"), 1.5], 3: "x"}) == \
        {"a": "inf", "b": ["-inf", "nan", 1.5], "3": "x"}
    table = format_table([{"a": "x", "K": "5"}, {"a": "longer", "K": "5000"}], columns=("a", "K"))
    assert table.splitlines() == ["a          K", "------  ----", "x          5", "longer  5000"]
    assert fmt_estimate({"mean": -1.23456, "stderr": 0.01}) == "-1.235 ± 0.010"
    assert fmt_estimate("n/a (no analytic KL for site z)") == "n/a (no analytic KL for site z)"


def test_categorical_latents_are_evaluated_without_traversals(tmp_path):
    """One-hot codes have no coordinate to move: no traversal picture, and the exported
    draws keep their (latent, category) shape."""
    run_dir = tmp_path / "categorical"
    pyro.clear_param_store()
    train(TrainConfig.from_flat(dict(prior="categorical", guide="categorical", latent_dim=2, num_categories=3, hidden=[16],
                      epochs=1, batch_size=512, run_dir=str(run_dir), progress=False)))
    assert main(["evaluate", str(run_dir), "--particles", "120", "--num-points", "12", "--no-progress",
                 "--export-posterior", "1", "--posterior-samples", "10"]) == 0
    report = _strict_json(run_dir / "evaluation.json")
    assert "latent_traversals" not in report["pictures"] and "latent_map" in report["pictures"]
    assert report["results"]["latent"]["event_shape"] == [2, 3]
    assert report["results"]["latent"]["latent_dim"] == 6
    z = arviz_compat.load_netcdf(report["posterior_export"]["path"]).posterior["z"]
    assert z.dims == ("chain", "draw", "point", "latent", "category") and z.shape == (1, 10, 1, 2, 3)
