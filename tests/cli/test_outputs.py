"""Output that cannot be written never costs a computation: evaluate checks its folder first,
writes its numbers before its pictures and says what it could not write; sample draws page by page;
train keeps its run when its pictures fail."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from pyro_vae.cli.main import main

FAST = ["--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "256", "--no-progress"]
EVALUATE = ["--particles", "20", "--num-points", "12", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("outputs") / "run"
    assert main(["train", *FAST, "--run-dir", str(run)]) == 0
    return run


def _copy(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somewhere")


def test_an_output_folder_that_cannot_be_written_is_refused_before_computing(run, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("pyro_vae.evaluation.run.evaluate_test_set",
                        lambda *a, **k: pytest.fail("computed although the output cannot be written"))
    assert main(["evaluate", str(run), *EVALUATE, "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write into" in err and "Not a directory" in err and "--out DIR" in err
    assert main(["sample", str(run), "--out", str(tmp_path / "file" / "out")]) == 2
    assert "cannot write into" in capsys.readouterr().err


def test_a_report_that_cannot_be_written_is_shown_instead_of_lost(run, tmp_path, capsys, monkeypatch):
    run = _copy(run, tmp_path)
    monkeypatch.setattr("pyro_vae.evaluation.run.write_report", _disk_full)
    assert main(["evaluate", str(run), *EVALUATE]) == 1
    out, err = capsys.readouterr()
    assert "could not write somewhere: No space left on device" in err and "here it is" in err
    report = json.loads(out[out.index("{"):])
    assert report["results"]["num_points"] == 12 and "mean" in report["results"]["log_likelihood"]
    assert not (run / "latent_map.png").exists()  # no picture after the numbers failed


def test_a_picture_that_fails_leaves_the_numbers_and_the_other_pictures(run, tmp_path, capsys, monkeypatch):
    run = _copy(run, tmp_path)
    for png in run.glob("*.png"):
        png.unlink()
    monkeypatch.setattr("pyro_vae.evaluation.plots.plot_latent_map", _disk_full)
    assert main(["evaluate", str(run), *EVALUATE]) == 1
    err = capsys.readouterr().err
    assert f"could not write {run / 'latent_map.png'}: No space left on device" in err
    report = json.loads((run / "evaluation.json").read_text())
    assert "mean" in report["results"]["log_likelihood"] and "latent_map" not in report["pictures"]
    assert (run / "samples.png").is_file() and (run / "latent_traversals.png").is_file()
    assert report["write_errors"] == [[str(run / "latent_map.png"), "No space left on device"]]


def test_evaluate_can_write_elsewhere(run, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["evaluate", str(run), *EVALUATE, "--no-plots", "--out", str(out)]) == 0
    assert (out / "evaluation.json").is_file() and (out / "evaluation.md").is_file()


def test_sample_streams_pages_of_at_most_one_hundred(run, tmp_path, capsys, monkeypatch):
    import pyro_vae.evaluation.pictures as pictures

    drawn = []
    real = pictures.sample_means

    def spy(program, num, *args, **kwargs):
        drawn.append(num)
        return real(program, num, *args, **kwargs)

    monkeypatch.setattr(pictures, "sample_means", spy)
    assert main(["sample", str(run), "--num", "250", "--out", str(tmp_path)]) == 0
    assert drawn == [100, 100, 50]
    assert sorted(p.name for p in tmp_path.glob("samples*.png")) == ["samples-0001.png", "samples-0002.png",
                                                                    "samples-0003.png"]
    assert "wrote 3 pages of samples" not in capsys.readouterr().out  # three pages are listed one by one
    assert main(["sample", str(run), "--num", "30", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("samples*.png")) == ["samples.png"]  # no stale pages
    assert not list(tmp_path.glob(".*.tmp.png"))
    assert main(["sample", str(run), "--num", str(10**13), "--out", str(tmp_path)]) == 2
    assert "ask for fewer samples" in capsys.readouterr().err


def test_training_keeps_its_run_when_its_pictures_cannot_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pyro_vae.evaluation.pictures.write_run_pictures", _disk_full)
    assert main(["train", *FAST, "--run-dir", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert "could not write the pictures" in err and "No space left on device" in err
    assert (tmp_path / "r" / "checkpoint.pt").is_file() and "checkpoint:" in out


def test_sigterm_while_sampling_stops_with_143_and_leaves_no_half_picture(run, tmp_path, capsys, monkeypatch):
    import os
    import signal

    import pyro_vae.evaluation.pictures as pictures

    real, pages = pictures.save_image_grid, []

    def term_on_second_page(x, path, *args, **kwargs):
        pages.append(path)
        if len(pages) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(x, path, *args, **kwargs)

    monkeypatch.setattr(pictures, "save_image_grid", term_on_second_page)
    assert main(["sample", str(run), "--num", "300", "--out", str(tmp_path)]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["samples-0001.png"]  # no temporary file is left
