"""The two pictures every run gets: prior samples and reconstructions of test inputs.

Samples are drawn and written page by page (at most :data:`PAGE_ROWS` x
:data:`PAGE_COLS` per picture), so ``pyro-vae sample --num N`` needs the memory
of one page whatever ``N`` is; one page is ``samples.png``, more are
``samples-0001.png``, ...  Each picture is written to a temporary file and
renamed, so a reader never sees half a picture.  The output folder is checked
before anything is computed (:func:`check_writable`).

The reconstructed test inputs are a fixed, varied selection
(:func:`reconstruction_indices`), not the first ones: test files are often
ordered (the static binarized MNIST test file starts with zeros).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from pyro_vae.evaluation.decoding import reconstruction_means, sample_means
from pyro_vae.evaluation.images import save_image_grid, save_reconstructions
from pyro_vae.train.memory import fmt_bytes
from pyro_vae.train.rundir import RunLock, replace_named
from pyro_vae.train.runs import Run, load_run

PAGE_ROWS = 10
PAGE_COLS = 10
#: Test inputs shown in ``reconstructions.png``.
NUM_RECONSTRUCTIONS = 50
#: A generous size of one page of samples, to check the free disk space before drawing.
PAGE_BYTES = 200_000


class OutputError(ValueError):
    """An output folder cannot be written, or too little space is left in it."""


def check_writable(folder: str | Path, option: str = "--out") -> Path:
    """Create ``folder`` if needed and prove it writable with a temporary file, before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write into {folder}: {e.strerror or e}; choose a writable folder with "
                          f"{option} DIR") from None
    return folder


def _atomic_picture(path: Path, draw: Callable[[Path], Any]) -> Path:
    """``draw(tmp)`` into a hidden temporary picture beside ``path``, then rename it to ``path``."""
    tmp = path.with_name(f".{path.stem}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        draw(tmp)
        replace_named(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_run_pictures(run_dir: str | Path, out_dir: str | Path | None = None, num: int = 100,
                       data_dir: str | None = None, device: str = "auto", seed: int = 0,
                       program: Any = None, allow_changed_data: bool = False) -> list[Path]:
    """Write the samples (decoder means at prior draws; one row per class for a conditional VAE)
    and ``reconstructions.png`` into ``out_dir`` (default: the run, locked meanwhile)."""
    run = load_run(run_dir, device, program=program)
    out = Path(out_dir) if out_dir else run.run_dir
    check_writable(out)
    pages = math.ceil(num / (PAGE_ROWS * PAGE_COLS))
    free = shutil.disk_usage(out).free
    if pages * PAGE_BYTES > free:
        raise OutputError(f"--num {num} makes {pages} pictures of up to {PAGE_ROWS * PAGE_COLS} samples, about "
                          f"{fmt_bytes(pages * PAGE_BYTES)}, but only {fmt_bytes(free)} are free in {out}; "
                          "ask for fewer samples")
    with RunLock(run.run_dir, "sampling") if out.resolve() == run.run_dir.resolve() else contextlib.nullcontext():
        data = run.load_data(data_dir, allow_changed_data)
        return draw_run_pictures(run, data, out, num, seed)


def reconstruction_indices(num_test: int, labels: torch.Tensor | None = None,
                           num: int = NUM_RECONSTRUCTIONS) -> torch.Tensor:
    """Indices of the ``num`` test inputs to reconstruct: the same on every call, spread over the
    whole test set.

    With ``labels``, every class gets ``num // classes`` inputs (at least one; fewer when a class
    has fewer), taken evenly spaced among that class's inputs, in the order first pick of each
    class, second pick of each class, ... so that a row of the picture shows one input per class.
    Without labels, ``num`` evenly spaced indices over the test set.  All inputs when there are
    at most ``num``.
    """
    if num_test <= num:
        return torch.arange(num_test)
    if labels is None:
        return _spread(torch.arange(num_test), num)
    labels = labels.detach().cpu()[:num_test]
    classes = torch.unique(labels)
    per_class = max(1, num // len(classes))
    picks = []
    for c in classes.tolist():
        where = torch.nonzero(labels == c).flatten()
        picks.append(_spread(where, per_class))
    order = [p[i] for i in range(per_class) for p in picks if i < len(p)]
    return torch.stack(order[:num])


def _spread(indices: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` of ``indices`` evenly spaced, the ends left out (all of them if there are at most ``num``)."""
    if len(indices) <= num:
        return indices
    positions = torch.linspace(0, len(indices) - 1, num + 2, dtype=torch.float64)[1:-1].round().long()
    return indices[positions]


def _pages(labels: list[int | None], per_row: int) -> list[tuple[list[int | None], int]]:
    """Split rows (one label each, ``per_row`` samples per row) into pages of at most
    PAGE_ROWS x PAGE_COLS: ``(row labels, columns)`` per page."""
    pages = []
    for col in range(0, per_row, PAGE_COLS):
        cols = min(PAGE_COLS, per_row - col)
        for row in range(0, len(labels), PAGE_ROWS):
            pages.append((labels[row:row + PAGE_ROWS], cols))
    return pages


def draw_run_pictures(run: Run, data, out: Path, num: int = 100, seed: int = 0) -> list[Path]:
    """Draw the samples page by page and the reconstructions of ``run`` into ``out``."""
    dev = run.device
    torch.manual_seed(seed)
    shape = run.image_shape or data.image_shape
    d = data.num_features
    if run.config.model.conditional:
        k = data.num_classes
        if num >= k:
            rows: list[int | None] = list(range(k))
            per_row = num // k
        else:  # fewer samples than classes: one each of the first classes
            rows, per_row = list(range(num)), 1
        title = "samples, one row per class"
    else:
        per_row = min(num, PAGE_COLS)
        rows = [None] * math.ceil(num / per_row)
        title = "samples from the prior"
    pages = _pages(rows, per_row)
    for old in out.glob("samples-*.png"):  # pages of an earlier, longer sampling
        old.unlink(missing_ok=True)
    width = max(4, len(str(len(pages))))
    paths = []
    remaining = num
    for i, (labels, cols) in enumerate(pages):
        name = "samples.png" if len(pages) == 1 else f"samples-{i + 1:0{width}d}.png"
        if labels[0] is None:
            count = min(remaining, len(labels) * cols)
            remaining -= count
            samples = sample_means(run.program, count, d, None, dev)
            row_labels = None
        else:
            y = torch.tensor(labels, device=dev).repeat_interleave(cols)
            samples = sample_means(run.program, y.shape[0], d, y, dev)
            row_labels = [str(c) for c in labels]
        paths.append(_atomic_picture(out / name, lambda p: save_image_grid(
            samples, p, shape, ncols=cols, title=title, row_labels=row_labels)))
    idx = reconstruction_indices(data.test.shape[0], data.test_labels)
    x = data.test[idx].to(dev)
    y = data.test_labels[idx].to(dev) if run.config.model.conditional else None
    recon = reconstruction_means(run.program, x, y)
    paths.append(_atomic_picture(out / "reconstructions.png", lambda p: save_reconstructions(x, recon, p, shape)))
    return paths
