"""The experiment scripts at their smoke size: every table, figure and raw-results file is written, a
second start skips the cells it has, and the Burda et al. schedule is scaled as documented."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import architectures  # noqa: E402
import beta_sweep  # noqa: E402
import burda_table  # noqa: E402
import common  # noqa: E402
import estimators  # noqa: E402
import priors_guides  # noqa: E402
import recipe  # noqa: E402


def _run(module, out: Path) -> dict:
    assert module.main(["--smoke", "--no-progress", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["smoke"] is True and data["machine"]["torch"]
    assert (out / "results.md").read_text().startswith("# ")
    return data


@pytest.mark.parametrize("module, figure", [(estimators, "curves.png"), (priors_guides, None),
                                            (beta_sweep, "rate_distortion.png"), (burda_table, None),
                                            (architectures, None), (recipe, None)])
def test_smoke_run_writes_every_output_and_a_second_start_skips_finished_cells(module, figure, tmp_path):
    data = _run(module, tmp_path)
    assert list(data["cells"]) == list(module.SMOKE_CELLS)
    for row in data["cells"].values():
        assert row["log_likelihood"]["mean"] >= row["elbo"]["mean"] - 3 * row["elbo"]["stderr"]
        assert row["epochs"] >= 1 and row["curve"] and row["eval_particles"] == 20
        assert (Path(row["run_dir"]) / "evaluation" / "evaluation.json").is_file()
    if figure:
        assert (tmp_path / figure).stat().st_size > 1000
    if module is estimators:  # and the gradient SNR of each estimator at each K
        snr = data["snr"]
        assert snr["run"] == "iwae-2" and (tmp_path / "snr.png").is_file()
        assert all(name in snr["table"] for name in estimators.SMOKE_SNR)
    mtimes = {key: (Path(row["run_dir"]) / "checkpoint.pt").stat().st_mtime_ns for key, row in data["cells"].items()}
    again = _run(module, tmp_path)
    assert again["cells"].keys() == data["cells"].keys()
    assert all((Path(row["run_dir"]) / "checkpoint.pt").stat().st_mtime_ns == mtimes[key]
               for key, row in again["cells"].items())


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    _run(beta_sweep, tmp_path)
    with pytest.raises(SystemExit, match="other settings"):
        beta_sweep.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--seed", "1"])


@pytest.mark.parametrize("budget", [0.0003, 0.0012, 0.003, 1.0])
def test_burda_schedule_scales_every_stage_by_the_budget_in_fractions_of_an_epoch(budget):
    stages = burda_table.schedule(budget)
    assert len(stages) == 8 and sum(p for p, _ in stages) == pytest.approx(budget * 3280)
    assert [p for p, _ in stages] == pytest.approx([budget * 3**i for i in range(8)])
    assert stages[0][1] == pytest.approx(1e-3) and stages[7][1] == pytest.approx(1e-3 * 10 ** (-1.0))
    ends = common.stage_ends([p for p, _ in stages], 2500)  # MNIST in batches of 20
    assert all(b > a for a, b in zip([0] + ends, ends))  # every stage at least one step
    assert ends[-1] == max(1, round(budget * 3280)) * 2500  # the last stage ends with an epoch
    if budget == 1.0:
        assert ends == [2500 * sum(3**j for j in range(i + 1)) for i in range(8)]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget"):
            burda_table.schedule(bad)


def test_stage_ends_in_steps():
    assert common.stage_ends([10], 7) == [70]  # a plain run of 10 epochs
    assert common.stage_ends([0.001, 0.001, 0.5], 100) == [1, 2, 100]  # at least a step each
    assert common.stage_ends([0.5, 0.6], 10) == [5, 10]  # 1.1 passes in all: one epoch
    assert common.stage_ends([1.4, 0.05], 10) == [14, 20]  # the last past the one before, at an epoch's end
    with pytest.raises(ValueError, match="positive number, got 0"):
        common.stage_ends([1, 0], 10)


def test_cells_are_shared_between_workers_by_cost():
    cells = [common.Cell(key, {}) for key in "abcde"]
    cost = dict(a=5, b=4, c=3, d=3, e=1)
    shares = common.share_cells(cells, 2, lambda cell: cost[cell.key])
    assert sorted(sum(shares, [])) == list("abcde")
    assert sorted(sum(cost[k] for k in share) for share in shares) == [8, 8]
    assert common.share_cells(cells[:1], 3, lambda cell: 1.0) == [["a"]]


def test_cells_run_apart_land_in_one_results_file_in_table_order(tmp_path):
    first, second = burda_table.SMOKE_CELLS[1], burda_table.SMOKE_CELLS[0]
    common = ["--smoke", "--no-progress", "--out", str(tmp_path), "--cells"]
    assert burda_table.main(common + [first]) == 0
    assert list(json.loads((tmp_path / "results.json").read_text())["cells"]) == [first]
    assert burda_table.main(common + [second]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["cells"]) == [second, first] and "--cells" not in data["command"]
    table_lines = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_lines) == 1 + 2  # the header and both cells
    with pytest.raises(SystemExit, match="no cell named 9layer"):
        burda_table.main(common + ["9layer-vae-k1"])


def test_the_recorded_command_is_the_whole_experiments():
    assert common.command_without_cells("python e.py --epochs 3 --cells a b --out r") == "python e.py --epochs 3 --out r"
    assert common.command_without_cells("python e.py --cells a") == "python e.py"


def test_results_continue_from_another_data_folder_but_record_none(tmp_path):
    """Where the data lies is not a setting (each run checks the data's fingerprint), so raw results
    carry no machine's path and continue wherever the data sets are."""
    def open_results(data_dir):
        args = burda_table.parser().parse_args(["--smoke", "--out", str(tmp_path), "--data-dir", data_dir])
        return common.Results(args.out, "burda", args)

    results = open_results(str(tmp_path / "here"))
    results.add("a-cell", {"log_likelihood": {"mean": -1.0}})
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert "data_dir" not in recorded["settings"]
    recorded["settings"]["data_dir"] = "$PYRO_VAE_DATA"  # as raw results written elsewhere may name it
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    again = open_results(str(tmp_path / "elsewhere"))
    assert list(again.cells) == ["a-cell"] and "data_dir" not in again.data["settings"]
    with pytest.raises(SystemExit, match="other settings"):  # a real setting still counts
        burda_table.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--seed", "3"])


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(tmp_path):
    first = burda_table.SMOKE_CELLS[0]
    argv = ["--smoke", "--no-progress", "--out", str(tmp_path), "--cells", first]
    args = burda_table.parser().parse_args(argv)
    results = common.Results(args.out, "burda", args)  # opened before the other process writes
    assert burda_table.main(argv) == 0  # the other process
    report = tmp_path / "runs" / first / "evaluation" / "evaluation.json"
    mtime = report.stat().st_mtime_ns
    common.run_cells(burda_table.cells(args), results, args)
    assert report.stat().st_mtime_ns == mtime and first in results.cells


def test_jobs_runs_the_cells_in_workers_into_one_results_file(tmp_path, capsys):
    assert burda_table.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--jobs", "2"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["cells"]) == list(burda_table.SMOKE_CELLS)  # table order, whoever ran them
    assert data["machine"]["workers"] == 2 and data["machine"]["torch_threads"] == 1
    assert all(row["passes"] == 2 and row["steps"] == 2 * 22 for row in data["cells"].values())
    out = capsys.readouterr().out
    assert all(f"{key} done" in out for key in burda_table.SMOKE_CELLS)
    text = (tmp_path / "results.md").read_text()
    assert "2 worker processes of 1 torch thread(s)" in text and "2 passes of the 3280" in text
    assert text.count("\n| ") == 2 + 3  # the header, its rule and the three cells


def test_a_failing_worker_fails_the_experiment_by_name_after_the_others_finish(tmp_path):
    broken = burda_table.SMOKE_CELLS[2]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / broken).write_text("a file where the cell's run directory goes")
    with pytest.raises(SystemExit, match=rf"worker \d \(cells [^)]*{broken}[^)]*\) exited with status 1"):
        burda_table.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--jobs", "2"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert broken not in data["cells"] and data["cells"]  # the other worker's cells are done
    assert (tmp_path / "results.md").is_file()


def test_burda_cells_trained_in_whole_epoch_stages_are_not_mixed_with_stages_in_steps(tmp_path):
    argv = ["--smoke", "--no-progress", "--out", str(tmp_path)]
    common.Results(tmp_path, "burda", burda_table.parser().parse_args(argv)).add("1layer-vae-k1", {"epochs": 2})
    with pytest.raises(SystemExit, match=r"stages of whole epochs \(1layer-vae-k1\)"):
        burda_table.main(argv)


@pytest.mark.parametrize("stop, said", [(KeyboardInterrupt("training of {key} was interrupted and saved"),
                                         "training of {key} was interrupted and saved"),
                                        (KeyboardInterrupt(), "cell {key} was interrupted")])
def test_a_stopped_cell_ends_the_script_with_one_line_and_status_130(stop, said, tmp_path, monkeypatch, capsys):
    key = burda_table.SMOKE_CELLS[0]

    def stopped(cell, args):
        raise type(stop)(*(arg.format(key=cell.key) for arg in stop.args))

    monkeypatch.setattr(common, "run_cell", stopped)
    with pytest.raises(SystemExit) as exit_:
        burda_table.main(["--smoke", "--no-progress", "--out", str(tmp_path)])
    assert exit_.value.code == 130 and exit_.value.__cause__ is None and exit_.value.__suppress_context__
    err = capsys.readouterr().err
    assert err == said.format(key=key) + "; run the same command again to continue\n"


def test_a_stop_while_the_workers_still_import_ends_them_cleanly_too(tmp_path, capfd):
    stop = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # the workers take seconds to import torch
    stop.start()
    try:
        with pytest.raises(SystemExit) as exit_:
            burda_table.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--jobs", "2"])
    finally:
        stop.cancel()
    assert exit_.value.code == 128 + signal.SIGINT
    err = capfd.readouterr().err
    assert "Traceback" not in err  # two workers and this process, one line each
    assert err.count("; run the same command again to continue\n") == 3
    assert not json.loads((tmp_path / "results.json").read_text())["cells"]
