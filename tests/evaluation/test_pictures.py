"""reconstructions.png shows a fixed, varied selection of test inputs, not the first ones."""

from __future__ import annotations

import torch

from pyro_vae.cli.main import main
from pyro_vae.evaluation import pictures
from pyro_vae.evaluation.pictures import NUM_RECONSTRUCTIONS, reconstruction_indices
from pyro_vae.train.runs import load_run


def test_without_labels_the_indices_spread_over_the_whole_test_set():
    idx = reconstruction_indices(10_000)
    assert len(idx) == NUM_RECONSTRUCTIONS == len(set(idx.tolist()))
    assert torch.equal(idx, idx.sort().values)
    assert idx[0] < 300 and idx[-1] > 9_700  # from near the start to near the end
    gaps = idx.diff()
    assert gaps.min() >= 190 and gaps.max() <= 200  # evenly spaced
    assert torch.equal(idx, reconstruction_indices(10_000))  # the same every time


def test_with_labels_every_class_appears_equally_one_per_class_in_each_row(digits):
    labels = digits.test_labels
    idx = reconstruction_indices(len(labels), labels)
    assert len(idx) == NUM_RECONSTRUCTIONS == len(set(idx.tolist()))
    shown = labels[idx]
    assert torch.bincount(shown, minlength=10).tolist() == [5] * 10
    for row in shown.reshape(5, 10):  # the picture's rows: ten pairs each
        assert row.tolist() == list(range(10))
    first = torch.arange(NUM_RECONSTRUCTIONS)
    assert not torch.equal(idx.sort().values, first)


def test_a_class_with_few_inputs_gives_what_it_has_and_small_sets_are_shown_whole():
    labels = torch.tensor([0] * 97 + [1] * 3)
    idx = reconstruction_indices(100, labels, num=50)
    assert sorted(labels[idx].tolist()).count(1) == 3 and sorted(labels[idx].tolist()).count(0) == 25
    assert torch.equal(reconstruction_indices(30), torch.arange(30))


def test_the_run_pictures_reconstruct_the_selected_inputs(tmp_path, monkeypatch, cpu_threads):
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "256",
                 "--no-progress", "--run-dir", str(run_dir)]) == 0
    shown = {}

    def capture(inputs, reconstructions, path, *args, **kwargs):
        shown["inputs"] = inputs
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(pictures, "save_reconstructions", capture)
    run = load_run(run_dir)
    data = run.load_data()
    pictures.draw_run_pictures(run, data, tmp_path, num=1)
    expected = data.test[reconstruction_indices(data.test.shape[0], data.test_labels)]
    assert torch.equal(shown["inputs"].cpu(), expected)
