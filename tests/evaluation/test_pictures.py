"""reconstructions.png shows a fixed, varied selection of test inputs, not the first ones; a grid of
images is drawn as one picture."""

from __future__ import annotations

import torch

from pyro_vae.cli.main import main
from pyro_vae.evaluation import pictures
from pyro_vae.evaluation.images import gap_for, save_image_grid, tile
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


def test_a_grid_is_one_canvas_of_the_images_with_gaps(tmp_path):
    images = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)
    canvas = tile(images, ncols=3, gap=1)
    assert canvas.shape == (2 * 2 + 1, 3 * 3 + 2)
    assert torch.equal(canvas[0:2, 0:3], images[0]) and torch.equal(canvas[0:2, 8:11], images[2])
    assert torch.equal(canvas[3:5, 4:7], images[4])
    assert canvas[2].isnan().all() and canvas[:, 3].isnan().all()  # the gaps
    assert canvas[3:5, 8:11].isnan().all()  # the empty cell after the last image
    assert gap_for(28, 28) == 2 and gap_for(8, 8) == 1


def test_save_image_grid_writes_a_png_shaped_like_the_grid(tmp_path):
    import matplotlib.image

    wide = save_image_grid(torch.rand(20, 64), tmp_path / "wide.png", (8, 8), ncols=10, row_labels=["a", "b"])
    tall = save_image_grid(torch.rand(20, 64), tmp_path / "tall.png", (8, 8), ncols=2, title="t")
    h_wide, w_wide = matplotlib.image.imread(wide).shape[:2]
    h_tall, w_tall = matplotlib.image.imread(tall).shape[:2]
    assert w_wide > 2 * h_wide and h_tall > 2 * w_tall


def test_a_picture_that_cannot_be_written_is_named_not_its_temporary_file(tmp_path, capsys, cpu_threads):
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "256",
                 "--no-progress", "--run-dir", str(run_dir)]) == 0
    (run_dir / "samples.png").unlink()
    (run_dir / "samples.png").mkdir()  # in the way of the picture
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--num", "4"]) == 1
    err = capsys.readouterr().err
    assert f"{run_dir / 'samples.png'}: cannot write it: a directory of that name is in the way" in err
    assert ".tmp" not in err and not list(run_dir.glob(".*.tmp*"))

