"""PNG pictures: image grids of samples and of reconstructions beside their inputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _as_images(x: torch.Tensor, image_shape: Sequence[int] | None) -> torch.Tensor:
    x = x.detach().float().cpu()
    if image_shape:
        return x.reshape(-1, *image_shape)
    side = math.isqrt(x.shape[-1])
    if side * side == x.shape[-1]:
        return x.reshape(-1, side, side)
    return x.reshape(-1, 1, x.shape[-1])  # not square: one row of pixels each


def gap_for(h: int, w: int) -> int:
    """Gap between the images of a grid, in their own pixels: 2 for 28 x 28, 1 for 8 x 8."""
    return max(1, round(max(h, w) / 14))


def tile(images: torch.Tensor, ncols: int, gap: int = 1) -> torch.Tensor:
    """One ``(rows * (h + gap) - gap, ncols * (w + gap) - gap)`` canvas of ``(n, h, w)`` images,
    row by row; the gaps and the cells after the last image are NaN."""
    n, h, w = images.shape
    nrows = math.ceil(n / ncols)
    canvas = torch.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap), float("nan"))
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = images[i]
    return canvas


def save_image_grid(x: torch.Tensor, path: str | Path, image_shape: Sequence[int] | None = None,
                    ncols: int = 10, title: str | None = None, row_labels: Sequence[str] | None = None) -> Path:
    """Save images (rows of ``x``) as a grid PNG at ``path``; values are shown in [0, 1].

    The grid is one picture (:func:`tile`) drawn once, with the row labels at its left, so a
    page of 100 images costs one ``imshow``, not one set of axes per image.
    """
    images = _as_images(x, image_shape).clamp(0, 1)
    n, h, w = images.shape
    ncols = max(1, min(ncols, n)) if n else max(1, ncols)
    nrows = max(1, math.ceil(n / ncols))
    gap = gap_for(h, w)
    canvas = tile(images, ncols, gap) if n else torch.full((h, w), float("nan"))
    strip = h == 1  # non-square data drawn as one row of pixels each: stretch the cells
    fig, ax = plt.subplots(figsize=(ncols * 0.9, nrows * 0.9 + (0.4 if title else 0)))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest",
              aspect="auto" if strip else "equal")
    ax.set_axis_off()
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            ax.text(-gap, r * (h + gap) + (h - 1) / 2, label, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout(pad=0.4)
    path = Path(path)
    fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def save_reconstructions(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                         image_shape: Sequence[int] | None = None, ncols: int = 10) -> Path:
    """Alternate rows of inputs and their reconstructions, ``ncols`` pairs per row pair."""
    n = inputs.shape[0] - inputs.shape[0] % ncols or inputs.shape[0]
    rows = []
    for start in range(0, n, ncols):
        rows += [inputs[start:start + ncols], reconstructions[start:start + ncols]]
    labels = ["input", "recon."] * (len(rows) // 2)
    return save_image_grid(torch.cat(rows), path, image_shape, ncols=min(ncols, n),
                           title="inputs (odd rows) and reconstructions (even rows)", row_labels=labels)
