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


def save_image_grid(x: torch.Tensor, path: str | Path, image_shape: Sequence[int] | None = None,
                    ncols: int = 10, title: str | None = None, row_labels: Sequence[str] | None = None) -> Path:
    """Save images (rows of ``x``) as a grid PNG at ``path``; values are shown in [0, 1]."""
    images = _as_images(x, image_shape).clamp(0, 1)
    n = images.shape[0]
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.9, nrows * 0.9 + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if i < n:
            ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
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
