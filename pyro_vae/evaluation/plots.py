"""Pictures of an evaluation (PNG, matplotlib): latent map, latent traversals, training
curves and the k-hat histogram; reconstructions and prior samples come from
:func:`pyro_vae.evaluation.pictures.write_run_pictures`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyro_vae.evaluation.diagnostics import KHAT_BAD, KHAT_GOOD  # noqa: E402
from pyro_vae.evaluation.images import save_image_grid  # noqa: E402
from pyro_vae.evaluation.decoding import means_at  # noqa: E402

LATENT_MAP = "latent_map.png"
TRAVERSALS = "latent_traversals.png"
CURVES = "training_curves.png"
KHAT_HISTOGRAM = "khat_histogram.png"


def principal_components(points: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, list[float]]:
    """Project ``(N, r)`` points on their first ``k`` principal components; also return the
    fraction of variance each explains."""
    centered = points.double() - points.double().mean(0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    var = s.pow(2)
    share = (var[:k] / var.sum()).tolist() if var.sum() > 0 else [0.0] * k
    return centered @ vh[:k].T, share


def plot_latent_map(means: torch.Tensor, labels: torch.Tensor | None, path: str | Path) -> Path:
    """Scatter of the guide means ``E_q[z | x]`` of test points, coloured by label when given.

    Two latent dimensions are shown as they are; wider latents by their first two
    principal components; one dimension against the label (or a jitter).
    """
    means = means.detach().double().cpu()
    r = means.shape[1]
    if r > 2:
        coords, share = principal_components(means)
        xlabel, ylabel = f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)"
        what = f"first two principal components of the {r}-d guide means"
    elif r == 2:
        coords, xlabel, ylabel, what = means, "z_0", "z_1", "guide means"
    else:
        g = torch.Generator().manual_seed(0)
        second = labels.double() if labels is not None else torch.rand(means.shape[0], generator=g, dtype=torch.double)
        second = second + 0.3 * (torch.rand(means.shape[0], generator=g, dtype=torch.double) - 0.5)
        coords = torch.stack([means[:, 0], second], 1)
        xlabel, ylabel, what = "z_0", "label (jittered)" if labels is not None else "jitter", "guide means"
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    size = max(2.0, min(12.0, 4000.0 / means.shape[0]))
    if labels is not None:
        lab = labels.detach().cpu().numpy()
        classes = np.unique(lab)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            sel = lab == c
            ax.scatter(coords[sel, 0], coords[sel, 1], s=size, alpha=0.7, color=cmap(i % cmap.N), label=str(c),
                       linewidths=0)
        ax.legend(title="label", markerscale=max(1.0, 12 / size), fontsize=8, loc="best", framealpha=0.8)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.6, linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"latent map: {what}\n({means.shape[0]} test points)", fontsize=10)
    return _save(fig, path)


@torch.no_grad()
def plot_latent_traversals(program, mean: torch.Tensor, dims: Sequence[int], path: str | Path,
                           image_shape: Sequence[int] | None = None, y: torch.Tensor | None = None,
                           steps: int = 9, span: float = 3.0, scores: Sequence[float] | None = None,
                           site: str = "z", input_dim: int | None = None) -> Path:
    """Decoder means as one latent coordinate at a time moves over ``mean_j + [-span, span]``
    (prior standard deviations), the others held at a data point's guide mean ``mean``.

    One row per dimension in ``dims`` (e.g. the highest-KL ones) of the latent site ``site``;
    the other latent sites, if any, are drawn from the prior.
    """
    if not dims:
        raise ValueError("latent traversals need at least one latent dimension")
    offsets = torch.linspace(-span, span, steps, dtype=mean.dtype, device=mean.device)
    rows = []
    for j in dims:
        z = mean.expand(steps, -1).clone()
        z[:, j] = mean[j] + offsets
        rows.append(z)
    z = torch.cat(rows)
    labels_y = None if y is None else y.reshape(1).expand(z.shape[0])
    width = input_dim or (math.prod(image_shape) if image_shape else None)
    if width is None:
        raise ValueError("latent traversals need the input size (input_dim or image_shape)")
    images = means_at(program, site, z, width, labels_y)
    labels = [f"z{j}" for j in dims]
    if scores is not None:
        labels = [f"z{j}\n{s:.2f}" for j, s in zip(dims, scores)]
    return save_image_grid(images, path, image_shape, ncols=steps, row_labels=labels,
                           title=f"latent traversals around one test point: z_j = mean_j + ({-span:g} .. {span:g})"
                                 + ("\nrow: dimension and its score (mean KL in nats, or activity)" if scores else ""))


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` (one per epoch; a resumed epoch keeps its last row)."""
    rows: dict[int, dict] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path | None:
    """Training objective and validation bounds per epoch from ``metrics.jsonl``; None when absent."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(epochs, [-r["train_loss"] for r in rows], marker="o", ms=3, label="train objective (-loss)")
    ax.plot(epochs, [r["valid_elbo"] for r in rows], marker="o", ms=3, label="validation ELBO")
    if any(r.get("valid_bound") is not None and r["valid_bound"] != r["valid_elbo"] for r in rows):
        ax.plot(epochs, [r["valid_bound"] for r in rows], marker="o", ms=3, label="validation training bound")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point (higher is better)")
    ax.set_title("training and validation curves", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_khat_histogram(khat: np.ndarray, path: str | Path) -> Path:
    """Histogram of per-point PSIS k-hat with the 0.5 and 0.7 thresholds marked."""
    k = np.asarray(khat, dtype=np.float64)
    finite = k[np.isfinite(k)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if finite.size:
        ax.hist(finite, bins=min(60, max(10, finite.size // 20)), color="tab:blue", alpha=0.8)
    for value, color, name in ((KHAT_GOOD, "tab:orange", "0.5"), (KHAT_BAD, "tab:red", "0.7")):
        ax.axvline(value, color=color, linestyle="--", label=f"k-hat = {name}: {np.mean(k > value):.1%} above")
    extra = ""
    if (k == -np.inf).any():
        extra = f"; {(k == -np.inf).sum()} points with constant weights (k-hat = -inf) not shown"
    ax.set_xlabel("PSIS k-hat of the importance weights")
    ax.set_ylabel("test points")
    ax.set_title(f"Pareto k-hat per test point ({k.size} points{extra})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
