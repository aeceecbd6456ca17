"""Evaluate a trained run: the function behind ``pyro-vae evaluate`` and :func:`pyro_vae.evaluate`.

It reopens the run (its own program, or the ``program`` passed back in for a
model/guide pair trained from Python objects), computes the test-set bounds,
log-likelihood and diagnostics (:mod:`pyro_vae.evaluation.evaluator`), writes
``evaluation.json`` and ``evaluation.md`` (:mod:`pyro_vae.evaluation.report`),
then the pictures, and optionally exports posterior draws for ArviZ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pyro
import torch

from pyro_vae.evaluation import plots
from pyro_vae.evaluation.diagnostics import export_posterior
from pyro_vae.evaluation.evaluator import (DEFAULT_IWAE_KS, DEFAULT_PARTICLES, DEFAULT_RENYI_ALPHAS,
                                           EvaluationOptions, EvaluationResult, evaluate_test_set)
from pyro_vae.evaluation.importance import DEFAULT_MAX_MEMORY_MB
from pyro_vae.evaluation.pictures import write_run_pictures
from pyro_vae.evaluation.report import package_versions, write_report
from pyro_vae.train.program import check_program_data
from pyro_vae.train.runs import Run, load_run

DEFAULT_POSTERIOR_SAMPLES = 1000
TRAVERSAL_DIMS = 8


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA memory on a GPU), in MB."""
    out: dict[str, float] = {}
    try:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux
    except ImportError:  # pragma: no cover - Windows
        pass
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def evaluate(run_dir: str | Path, particles: int = DEFAULT_PARTICLES, *, num_points: int | None = None,
             iwae_ks: Sequence[int] = DEFAULT_IWAE_KS, alphas: Sequence[float] = DEFAULT_RENYI_ALPHAS,
             max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, seed: int = 0, plots_: bool = True,
             export_indices: Sequence[int] | None = None, posterior_samples: int = DEFAULT_POSTERIOR_SAMPLES,
             data_dir: str | None = None, device: str = "auto", progress: bool = False,
             program: Any = None) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` on its test set and write its report; return the report.

    ``particles`` is ``K``, the importance samples per test point (5000 as in
    Burda et al. 2016); ``num_points`` evaluates only the first test points
    (quick looks, not comparable with full-test-set numbers).
    """
    t_start = time.perf_counter()
    run = load_run(run_dir, device, program=program)
    data = run.load_data(data_dir)
    dev = run.device
    n_total = data.test.shape[0]
    n = min(num_points or n_total, n_total)
    x = data.test[:n].to(dev)
    labels = None if data.test_labels is None else data.test_labels[:n].to(dev)
    y = labels if run.config.model.conditional else None
    check_program_data(run.program, x, f"{data.name} test data")
    if export_indices:
        bad = [i for i in export_indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"--export-posterior indices {bad} are out of range: evaluating {n} test points")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    pyro.set_rng_seed(seed)
    options = EvaluationOptions(num_particles=particles, iwae_ks=tuple(iwae_ks), renyi_alphas=tuple(alphas),
                                max_memory_mb=max_memory_mb, progress=progress)
    evaluation = evaluate_test_set(run.program, x, y, options)
    flat = run.config.to_flat()
    if program is not None or flat["program"]:  # a user's program: the built-in model options do not apply
        flat = {**flat, "program": flat["program"] or run.program.name}
    report: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "test_set": {"name": data.name, "split": "test", "num_points": n, "subset": n < n_total},
        "config": {k: flat[k] for k in ("data", "objective", "particles", "alpha", "program", "prior", "guide",
                                        "decoder", "latent_dim", "hidden", "beta", "epochs")},
        "checkpoint_epoch": run.state.get("epoch"),  # epochs behind the evaluated (best) checkpoint
        "seed": seed,
        "num_particles": particles,
        "device": str(dev),
        "results": evaluation.summary(),
        "importance_sampling_seconds": evaluation.seconds,
        **peak_memory_mb(dev),
        "pictures": {},
        "posterior_export": None,
        "versions": package_versions(),
    }
    # The numbers are written first: a picture that cannot be drawn never costs the computation.
    report["seconds"] = time.perf_counter() - t_start
    write_report(report, run.run_dir)
    if plots_:
        report["pictures"] = {k: str(v) for k, v in write_pictures(run, data, evaluation, x, labels, data_dir,
                                                                   device, seed, program).items()}
    if export_indices:
        path = export_posterior(run.program, x, y, list(export_indices), run.run_dir / "posterior.nc",
                                num_samples=posterior_samples)
        report["posterior_export"] = {"path": str(path), "indices": list(export_indices), "draws": posterior_samples}
    report["seconds"] = time.perf_counter() - t_start
    report["report_files"] = [str(p) for p in write_report(report, run.run_dir)]
    return report


def write_pictures(run: Run, data, evaluation: EvaluationResult, x: torch.Tensor, labels: torch.Tensor | None,
                   data_dir: str | None, device: str, seed: int, program: Any = None) -> dict[str, Path]:
    """All evaluation pictures into the run directory (see :mod:`pyro_vae.evaluation.plots`)."""
    out = run.run_dir
    written = write_run_pictures(run.run_dir, data_dir=data_dir, device=device, seed=seed, program=program)
    pictures = {p.stem: p for p in written}
    pictures["latent_map"] = plots.plot_latent_map(evaluation.guide_means, labels, out / plots.LATENT_MAP)
    latent = evaluation.latent
    if len(latent.event_shape) == 1:  # not for (n, k) one-hot codes of categorical latents
        ranked = latent.ranked_dimensions()[:TRAVERSAL_DIMS]
        score = latent.kl_per_dim or latent.activity
        y0 = labels[0] if run.config.model.conditional else None
        mean0 = evaluation.guide_means[0].to(device=x.device, dtype=x.dtype)
        pictures["latent_traversals"] = plots.plot_latent_traversals(
            run.program, mean0, ranked, out / plots.TRAVERSALS, run.image_shape or data.image_shape, y=y0,
            scores=[score[j] for j in ranked], site=latent.site, input_dim=data.num_features)
    curves = plots.plot_training_curves(out / "metrics.jsonl", out / plots.CURVES)
    if curves is not None:
        pictures["training_curves"] = curves
    if evaluation.khat is not None:
        pictures["khat_histogram"] = plots.plot_khat_histogram(evaluation.khat, out / plots.KHAT_HISTOGRAM)
    return pictures
