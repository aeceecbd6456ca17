"""The two pictures every run gets: prior samples and reconstructions of test inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pyro_vae.evaluation.decoding import reconstruction_means, sample_means
from pyro_vae.evaluation.images import save_image_grid, save_reconstructions
from pyro_vae.train.runs import load_run


def write_run_pictures(run_dir: str | Path, out_dir: str | Path | None = None, num: int = 100,
                       data_dir: str | None = None, device: str = "auto", seed: int = 0,
                       program: Any = None) -> list[Path]:
    """Write ``samples.png`` (decoder means at prior draws; one row per class for a
    conditional VAE) and ``reconstructions.png`` into ``out_dir`` (default: the run)."""
    run = load_run(run_dir, device, program=program)
    out = Path(out_dir) if out_dir else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    dev = run.device
    torch.manual_seed(seed)
    data = run.load_data(data_dir)
    shape = run.image_shape or data.image_shape
    d = data.num_features
    if run.config.model.conditional:
        k = data.num_classes
        per_class = max(1, num // k)
        y = torch.arange(k, device=dev).repeat_interleave(per_class)
        samples = sample_means(run.program, y.shape[0], d, y, dev)
        paths = [save_image_grid(samples, out / "samples.png", shape, ncols=per_class,
                                 title="samples, one row per class",
                                 row_labels=[str(c) for c in range(k)])]
    else:
        samples = sample_means(run.program, num, d, None, dev)
        paths = [save_image_grid(samples, out / "samples.png", shape, title="samples from the prior")]
    n = min(50, data.test.shape[0])
    x = data.test[:n].to(dev)
    y = data.test_labels[:n].to(dev) if run.config.model.conditional else None
    paths.append(save_reconstructions(x, reconstruction_means(run.program, x, y), out / "reconstructions.png", shape))
    return paths
