"""The experiment scripts at their smoke size: every table, figure and raw-results file is written, a
second start skips the cells it has, and the Burda et al. schedule is scaled as documented."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import architectures  # noqa: E402
import beta_sweep  # noqa: E402
import burda_table  # noqa: E402
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


@pytest.mark.parametrize("budget, epochs", [(0.003, 10), (0.01, 33), (1.0, 3280)])
def test_burda_schedule_keeps_the_stages_and_scales_the_passes(budget, epochs):
    stages = burda_table.schedule(budget)
    assert len(stages) == 8 and sum(e for e, _ in stages) == epochs
    assert all(e >= 1 for e, _ in stages)
    assert [e for e, _ in stages] == sorted(e for e, _ in stages)
    assert stages[0][1] == pytest.approx(1e-3) and stages[7][1] == pytest.approx(1e-3 * 10 ** (-1.0))
    if budget == 1.0:
        assert [e for e, _ in stages] == [3**i for i in range(8)]
    with pytest.raises(ValueError, match="budget"):
        burda_table.schedule(0.0)


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
    import common

    assert common.command_without_cells("python e.py --epochs 3 --cells a b --out r") == "python e.py --epochs 3 --out r"
    assert common.command_without_cells("python e.py --cells a") == "python e.py"


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(tmp_path):
    import argparse

    import common

    first = burda_table.SMOKE_CELLS[0]
    argv = ["--smoke", "--no-progress", "--out", str(tmp_path), "--cells", first]
    parser = common.experiment_parser("", "burda")
    parser.add_argument("--budget", type=float, default=0.003)
    args: argparse.Namespace = parser.parse_args(argv)
    results = common.Results(args.out, "burda", args)  # opened before the other process writes
    assert burda_table.main(argv) == 0  # the other process
    report = tmp_path / "runs" / first / "evaluation" / "evaluation.json"
    mtime = report.stat().st_mtime_ns
    common.run_cells(burda_table.cells(args), results, args)
    assert report.stat().st_mtime_ns == mtime and first in results.cells
