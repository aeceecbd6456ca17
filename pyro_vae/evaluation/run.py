"""Evaluate a trained run: the function behind ``pyro-vae evaluate`` and :func:`pyro_vae.evaluate`.

It reopens the run (its own program, or the ``program`` passed back in for a
model/guide pair trained from Python objects), computes the test-set bounds,
log-likelihood and diagnostics (:mod:`pyro_vae.evaluation.evaluator`), writes
``evaluation.json`` and ``evaluation.md`` (:mod:`pyro_vae.evaluation.report`),
then the pictures, and optionally exports posterior draws for ArviZ.

Output that cannot be written never costs the computation: the output folder
is checked before anything is computed, the numbers are written before any
picture, and each picture or export that fails is reported by name
(``report["write_errors"]``) while the others are still written.

Launched as several processes (``torchrun ... -m pyro_vae evaluate``), the ranks
share out the test set (:func:`~pyro_vae.evaluation.evaluator.evaluate_test_set`
with a distributed world), every rank gets the gathered per-point results, and
rank 0 alone locks the run, writes the report and draws the pictures; each
point's draws are seeded from ``seed`` and its index, so the numbers are those
of one process with the same chunk plan.
"""

from __future__ import annotations

import json
import math
import numbers
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import pyro
import torch

from pyro_vae.evaluation import plots
from pyro_vae.evaluation.diagnostics import export_posterior
from pyro_vae.evaluation.evaluator import (DEFAULT_IWAE_KS, DEFAULT_PARTICLES, DEFAULT_RENYI_ALPHAS,
                                           EvaluationOptions, EvaluationResult, evaluate_test_set)
from pyro_vae.evaluation.importance import DEFAULT_MAX_MEMORY_MB, GROUP_BYTES_PER_PAIR_FLOAT64
from pyro_vae.evaluation.pictures import check_writable, draw_run_pictures
from pyro_vae.evaluation.report import checkpoint_identity, jsonable, package_versions, write_report
from pyro_vae.train.distributed import World, join
from pyro_vae.train.memory import check_fits
from pyro_vae.train.program import check_program_data
from pyro_vae.train.rundir import RunLock, read_metrics
from pyro_vae.train.runs import Run, load_run
from pyro_vae.train.trainer import resolve_device

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
             program: Any = None, allow_changed_data: bool = False,
             out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` on its test set and write its report; return the report.

    ``particles`` is ``K``, the importance samples per test point (5000 as in
    Burda et al. 2016); ``num_points`` evaluates only the first test points
    (quick looks, not comparable with full-test-set numbers).  The report and
    pictures go to ``out_dir`` (default: the run directory, locked meanwhile).
    Data that differs from the data the run was trained on is refused unless
    ``allow_changed_data`` (then a warning).  Files that could not be written
    are listed in ``report["write_errors"]`` as ``(path, reason)``.

    Under a launch of several processes every rank calls this and gets the report;
    rank 0 alone writes it.
    """
    t_start = time.perf_counter()
    check_arguments(particles=particles, num_points=num_points, iwae_ks=iwae_ks, alphas=alphas,
                    max_memory_mb=max_memory_mb, seed=seed, export_indices=export_indices,
                    posterior_samples=posterior_samples)
    particles, seed, posterior_samples = int(particles), int(seed), int(posterior_samples)  # numpy integers too
    num_points = None if num_points is None else int(num_points)
    iwae_ks, alphas = [int(k) for k in iwae_ks], [float(a) for a in alphas]
    export_indices = None if export_indices is None else [int(i) for i in export_indices]
    world = join(resolve_device(device), device)
    run = load_run(run_dir, str(world.device) if world.distributed else device, program=program)
    out = Path(out_dir) if out_dir else run.run_dir
    locks: list[RunLock | None] = []  # rank 0's lock stays with rank 0
    world.share(lambda: locks.append(_claim_output(run, out)))
    lock = locks[0] if locks else None
    try:
        report = _evaluate(run, out, t_start, particles, num_points, iwae_ks, alphas, max_memory_mb, seed, plots_,
                           export_indices, posterior_samples, data_dir, allow_changed_data, progress, world)
        world.finished()
        return report
    finally:
        if lock is not None:
            lock.release()


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def check_arguments(*, particles: Any, num_points: Any, iwae_ks: Any, alphas: Any, max_memory_mb: Any, seed: Any,
                    export_indices: Any, posterior_samples: Any) -> None:
    """Refuse an argument of :func:`evaluate` of the wrong type or range by its name, before the run
    is opened or anything is computed (the command line's flags are checked as they are parsed)."""
    def finite(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    problems = []
    if not _is_count(particles, 1):
        problems.append(f"particles must be a positive integer, got {particles!r}")
    if num_points is not None and not _is_count(num_points, 1):
        problems.append(f"num_points must be a positive integer (or None for the whole test set), got {num_points!r}")
    if isinstance(iwae_ks, (str, bytes)) or not all(_is_count(k, 1) for k in iwae_ks):
        problems.append(f"iwae_ks must be positive integers, got {iwae_ks!r}")
    if isinstance(alphas, (str, bytes)) or not all(finite(a) for a in alphas):
        problems.append(f"alphas must be finite numbers, got {alphas!r}")
    if not (finite(max_memory_mb) and max_memory_mb > 0):
        problems.append(f"max_memory_mb must be a positive finite number, got {max_memory_mb!r}")
    if not (_is_count(seed, 0) and seed <= 2**32 - 1):
        problems.append(f"seed must be an integer in [0, {2**32 - 1}], got {seed!r}")
    if export_indices is not None and (isinstance(export_indices, (str, bytes))
                                       or not all(_is_count(i, 0) for i in export_indices)):
        problems.append(f"export_indices must be test-point indices >= 0, got {export_indices!r}")
    if not _is_count(posterior_samples, 1):
        problems.append(f"posterior_samples must be a positive integer, got {posterior_samples!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _claim_output(run: Run, out: Path) -> RunLock | None:
    """Check that ``out`` can be written, and lock the run when the report goes into it."""
    check_writable(out, "--out")
    lock = RunLock(run.run_dir, "evaluating") if out.resolve() == run.run_dir.resolve() else None
    if lock is not None:
        lock.acquire()
    return lock


def _evaluate(run: Run, out: Path, t_start: float, particles: int, num_points: int | None,
              iwae_ks: Sequence[int], alphas: Sequence[float], max_memory_mb: float, seed: int, plots_: bool,
              export_indices: Sequence[int] | None, posterior_samples: int, data_dir: str | None,
              allow_changed_data: bool, progress: bool, world: World | None = None) -> dict[str, Any]:
    world = world or World()
    data = run.load_data(data_dir, allow_changed_data)
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
        check_fits(4.0 * posterior_samples * len(export_indices) * (3 * data.num_features + 64),
                   f"exporting {posterior_samples} posterior draws for {len(export_indices)} test point(s)",
                   "lower --posterior-samples or export fewer points", dev)
    per_pair = 3 * 4 + 8 * GROUP_BYTES_PER_PAIR_FLOAT64  # the (K, points) arrays of a group, per pair
    check_fits(float(per_pair) * particles, f"--particles {particles} (the importance weights of one test point)",
               "lower --particles", dev)
    bad_ks = [k for k in iwae_ks if k > particles]
    if bad_ks and tuple(iwae_ks) != tuple(DEFAULT_IWAE_KS):  # the defaults adapt to K: those above it are left out
        raise ValueError(f"--iwae-k {' '.join(map(str, bad_ks))} exceed(s) --particles {particles}: an IWAE-k bound "
                         f"is averaged over groups of k of the K draws; choose k <= {particles}")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    pyro.set_rng_seed(seed)
    options = EvaluationOptions(num_particles=particles, iwae_ks=tuple(iwae_ks), renyi_alphas=tuple(alphas),
                                max_memory_mb=max_memory_mb, progress=progress)
    evaluation = evaluate_test_set(run.program, x, y, options, world)
    flat = run.config.to_flat()
    report: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "test_set": {"name": data.name, "split": "test", "num_points": n, "subset": n < n_total},
        "config": {k: flat[k] for k in ("data", "objective", "particles", "alpha", "program", "prior", "guide",
                                        "decoder", "latent_dim", "hidden", "beta", "epochs")},
        "checkpoint_epoch": run.state.get("epoch"),  # epochs behind the evaluated (best) checkpoint
        "checkpoint": checkpoint_identity(run.checkpoint_path, run.state),
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
    if world.distributed:
        report["processes"] = world.size
    if not world.is_main:  # rank 0 writes the report and draws the pictures
        report.update(seconds=time.perf_counter() - t_start, report_files=[], write_errors=[])
        return report
    errors: list[tuple[str, str]] = []
    # The numbers are written first: a picture that cannot be drawn never costs the computation.
    report["seconds"] = time.perf_counter() - t_start
    report["report_files"] = _write_report(report, out, errors)
    if not report["report_files"]:
        report["write_errors"] = errors
        return report  # nothing more can be written there; the caller shows the numbers
    if plots_:
        report["pictures"] = {k: str(v) for k, v in write_pictures(run, data, evaluation, x, labels, seed, out,
                                                                   errors).items()}
    if export_indices:
        try:
            path = export_posterior(run.program, x, y, list(export_indices), out / "posterior.nc",
                                    num_samples=posterior_samples)
            report["posterior_export"] = {"path": str(path), "indices": list(export_indices),
                                          "draws": posterior_samples}
        except OSError as e:
            errors.append((str(out / "posterior.nc"), e.strerror or str(e)))
    report["seconds"] = time.perf_counter() - t_start
    report["write_errors"] = errors
    report["report_files"] = _write_report(report, out, errors) or report["report_files"]
    return report


def _write_report(report: dict[str, Any], out: Path, errors: list[tuple[str, str]]) -> list[str]:
    try:
        return [str(p) for p in write_report({k: v for k, v in report.items() if k != "report_files"}, out)]
    except OSError as e:
        errors.append((str(e.filename or out), e.strerror or str(e)))
        return []


def report_json(report: dict[str, Any]) -> str:
    """The report as strict JSON text (for showing it when it could not be written)."""
    return json.dumps(jsonable(report), indent=2, allow_nan=False)


def _plot_training_curves(metrics: Path, path: Path) -> Path | None:
    """The training curves from the rows of ``metrics`` that can be read: a line torn by a kill or
    damaged otherwise is left out (and said), never the picture."""
    rows, skipped = read_metrics(metrics)
    if not skipped:
        return plots.plot_training_curves(metrics, path)
    warnings.warn(f"{metrics}: {skipped} line(s) are not rows of metrics (torn by a kill, or edited); the "
                  "training curves show the other rows", stacklevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / metrics.name
        clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return plots.plot_training_curves(clean, path)


def write_pictures(run: Run, data, evaluation: EvaluationResult, x: torch.Tensor, labels: torch.Tensor | None,
                   seed: int, out: Path | None = None, errors: list[tuple[str, str]] | None = None
                   ) -> dict[str, Path]:
    """All evaluation pictures into ``out`` (default: the run directory; see
    :mod:`pyro_vae.evaluation.plots`).  A picture that fails is recorded in ``errors`` as
    ``(file, reason)`` and the others are still drawn."""
    out = out or run.run_dir
    errors = [] if errors is None else errors
    pictures: dict[str, Path] = {}

    def attempt(name: str, file: str, draw) -> None:
        try:
            result = draw()
        except Exception as e:  # one picture never costs the others (or the numbers, already written)
            reason = getattr(e, "strerror", None) or f"drawing it failed ({type(e).__name__}: {e})"
            errors.append((str(out / file), reason))
            return
        if isinstance(result, dict):
            pictures.update(result)
        elif result is not None:
            pictures[name] = result

    attempt("samples", "samples.png / reconstructions.png",
            lambda: {p.stem: p for p in draw_run_pictures(run, data, out, seed=seed)})
    attempt("latent_map", plots.LATENT_MAP,
            lambda: plots.plot_latent_map(evaluation.guide_means, labels, out / plots.LATENT_MAP))
    latent = evaluation.latent
    if len(latent.event_shape) == 1:  # not for (n, k) one-hot codes of categorical latents
        ranked = latent.ranked_dimensions()[:TRAVERSAL_DIMS]
        score = latent.kl_per_dim or latent.activity
        y0 = labels[0] if run.config.model.conditional else None
        mean0 = evaluation.guide_means[0].to(device=x.device, dtype=x.dtype)
        attempt("latent_traversals", plots.TRAVERSALS, lambda: plots.plot_latent_traversals(
            run.program, mean0, ranked, out / plots.TRAVERSALS, run.image_shape or data.image_shape, y=y0,
            scores=[score[j] for j in ranked], site=latent.site, input_dim=data.num_features))
    attempt("training_curves", plots.CURVES, lambda: _plot_training_curves(run.run_dir / "metrics.jsonl",
                                                                          out / plots.CURVES))
    if evaluation.khat is not None:
        attempt("khat_histogram", plots.KHAT_HISTOGRAM,
                lambda: plots.plot_khat_histogram(evaluation.khat, out / plots.KHAT_HISTOGRAM))
    return pictures
