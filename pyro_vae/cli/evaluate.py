"""``pyro-vae evaluate RUN_DIR`` and ``pyro-vae compare RUN_DIR...``.

``evaluate`` computes the importance-sampled test log-likelihood and every
bound beside it (:mod:`pyro_vae.evaluation.evaluator`), latent and guide diagnostics
(:mod:`pyro_vae.evaluation.diagnostics`), pictures (:mod:`pyro_vae.evaluation.plots`),
optionally exports posterior draws for ArviZ, and writes ``evaluation.json``
and ``evaluation.md`` into the run (:mod:`pyro_vae.evaluation.report`).  ``compare``
prints those reports side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_POSTERIOR_SAMPLES = 1000
TRAVERSAL_DIMS = 8


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an index >= 0, got {text}")
    return value


def add_parsers(sub) -> None:
    from pyro_vae.cli.arguments import positive_int
    from pyro_vae.evaluation.evaluator import (
        DEFAULT_IWAE_KS,
        DEFAULT_PARTICLES,
        DEFAULT_RENYI_ALPHAS,
    )
    from pyro_vae.evaluation.importance import DEFAULT_MAX_MEMORY_MB

    p = sub.add_parser("evaluate", help="test log-likelihood, bounds, diagnostics, pictures and a report")
    p.add_argument("run_dir")
    p.add_argument("--particles", type=positive_int, default=DEFAULT_PARTICLES,
                   help=f"importance samples K per test point (default {DEFAULT_PARTICLES}, as in Burda et al.)")
    p.add_argument("--max-memory", type=_positive_float, default=DEFAULT_MAX_MEMORY_MB, metavar="MB",
                   help=f"memory budget of one chunk of the computation, in MB (default {DEFAULT_MAX_MEMORY_MB:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the importance draws (default 0)")
    p.add_argument("--num-points", type=positive_int, default=None, metavar="N",
                   help="evaluate only the first N test points (quick looks)")
    p.add_argument("--iwae-k", type=positive_int, nargs="+", default=list(DEFAULT_IWAE_KS), metavar="K",
                   help=f"IWAE bounds to report, from the same draws (default {' '.join(map(str, DEFAULT_IWAE_KS))})")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_RENYI_ALPHAS), metavar="ALPHA",
                   help=f"Renyi bounds to report (default {' '.join(map(str, DEFAULT_RENYI_ALPHAS))})")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no pictures")
    p.add_argument("--export-posterior", type=_non_negative_int, nargs="+", default=None, metavar="IDX",
                   help="test indices whose guide draws are saved as ArviZ netCDF (posterior.nc)")
    p.add_argument("--posterior-samples", type=positive_int, default=DEFAULT_POSTERIOR_SAMPLES,
                   help=f"draws per exported input (default {DEFAULT_POSTERIOR_SAMPLES})")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("compare", help="table of several evaluated runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pyro

    from pyro_vae.evaluation.diagnostics import export_posterior
    from pyro_vae.evaluation.evaluator import EvaluationOptions, evaluate_test_set
    from pyro_vae.evaluation.importance import module_device
    from pyro_vae.evaluation.report import package_versions, write_report
    from pyro_vae.train.runs import load_run

    t_start = time.perf_counter()
    run = load_run(args.run_dir, args.device)
    data = run.load_data(args.data_dir)
    device = module_device(run.vae)
    n_total = data.test.shape[0]
    n = min(args.num_points or n_total, n_total)
    x = data.test[:n].to(device)
    labels = None if data.test_labels is None else data.test_labels[:n].to(device)
    y = labels if run.config.model.conditional else None
    run.vae.decoder.check_data(x, f"{data.name} test data")
    if args.export_posterior:
        bad = [i for i in args.export_posterior if i >= n]
        if bad:
            raise ValueError(f"--export-posterior indices {bad} are out of range: evaluating {n} test points")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pyro.set_rng_seed(args.seed)
    options = EvaluationOptions(num_particles=args.particles, iwae_ks=tuple(args.iwae_k),
                                renyi_alphas=tuple(args.alphas), max_memory_mb=args.max_memory,
                                progress=args.progress)
    evaluation = evaluate_test_set(run.vae, x, y, options)
    memory = peak_memory_mb(device)
    pictures: dict[str, str] = {}
    if args.plots:
        pictures = {k: str(v) for k, v in write_pictures(run, data, evaluation, x, labels, args).items()}
    export = None
    if args.export_posterior:
        path = export_posterior(run.vae, x, y, list(args.export_posterior), run.run_dir / "posterior.nc",
                                num_samples=args.posterior_samples)
        export = {"path": str(path), "indices": list(args.export_posterior), "draws": args.posterior_samples}
    report: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "test_set": {"name": data.name, "split": "test", "num_points": n, "subset": n < n_total},
        "config": {k: run.config.to_flat()[k] for k in ("data", "objective", "particles", "alpha", "prior", "guide",
                                                        "decoder", "latent_dim", "hidden", "beta", "epochs")},
        "checkpoint_epoch": run.state.get("epoch"),  # epochs behind the evaluated (best) checkpoint
        "seed": args.seed,
        "num_particles": args.particles,
        "device": str(device),
        "results": evaluation.summary(),
        "importance_sampling_seconds": evaluation.seconds,
        **memory,
        "pictures": pictures,
        "posterior_export": export,
        "versions": package_versions(),
        "seconds": time.perf_counter() - t_start,
    }
    json_path, md_path = write_report(report, run.run_dir)
    print_summary(report)
    print(f"wrote {json_path}\nwrote {md_path}")
    for path in pictures.values():
        print(f"picture: {path}")
    if export:
        print(f"posterior draws: {export['path']}")
    return 0


def write_pictures(run, data, evaluation, x: torch.Tensor, labels: torch.Tensor | None,
                   args: argparse.Namespace) -> dict[str, Path]:
    """All evaluation pictures into the run directory (see :mod:`pyro_vae.evaluation.plots`)."""
    from pyro_vae.evaluation import plots as plots
    from pyro_vae.evaluation.pictures import write_run_pictures

    out = run.run_dir
    written = write_run_pictures(run.run_dir, data_dir=args.data_dir, device=args.device, seed=args.seed)
    pictures = {p.stem: p for p in written}
    pictures["latent_map"] = plots.plot_latent_map(evaluation.guide_means, labels, out / plots.LATENT_MAP)
    if len(evaluation.latent.event_shape) == 1:  # not for (n, k) one-hot codes of categorical latents
        ranked = evaluation.latent.ranked_dimensions()[:TRAVERSAL_DIMS]
        score = evaluation.latent.kl_per_dim or evaluation.latent.activity
        y0 = labels[0] if run.config.model.conditional else None
        mean0 = evaluation.guide_means[0].to(device=x.device, dtype=x.dtype)
        pictures["latent_traversals"] = plots.plot_latent_traversals(
            run.vae, mean0, ranked, out / plots.TRAVERSALS, run.image_shape or data.image_shape, y=y0,
            scores=[score[j] for j in ranked])
    curves = plots.plot_training_curves(out / "metrics.jsonl", out / plots.CURVES)
    if curves is not None:
        pictures["training_curves"] = curves
    if evaluation.khat is not None:
        pictures["khat_histogram"] = plots.plot_khat_histogram(evaluation.khat, out / plots.KHAT_HISTOGRAM)
    return pictures


def print_summary(report: dict[str, Any]) -> None:
    from pyro_vae.evaluation.report import fmt_estimate

    res = report["results"]
    print(f"{report['test_set']['name']} test set, {res['num_points']} points, K={res['num_particles']}, "
          f"seed {report['seed']} ({report['importance_sampling_seconds']:.1f} s importance sampling, "
          f"peak RSS {report.get('peak_rss_mb', float('nan')):.0f} MB)")
    rows = [("log p(x) (IS)", res["log_likelihood"]), ("ELBO (MC)", res["elbo"]),
            ("ELBO (analytic KL)", res["elbo_analytic_kl"]), ("reconstruction", res["reconstruction"]),
            ("KL (MC)", res["kl"]), ("gap log p(x)-ELBO", res["gap"])]
    rows += [(f"IWAE k={k}", est) for k, est in res["iwae"].items()]
    rows += [(f"Renyi alpha={a}", est) for a, est in res["renyi"].items()]
    for name, est in rows:
        print(f"  {name:20s} {fmt_estimate(est)}")
    latent = res["latent"]
    print(f"  active units         {latent['active_units']}/{latent['latent_dim']}")
    psis = res["psis"]
    if isinstance(psis, dict):
        print(f"  k-hat > 0.5 / > 0.7  {psis['fraction_above_0.5']:.1%} / {psis['fraction_above_0.7']:.1%}")
    else:
        print(f"  k-hat                {psis}")


def cmd_compare(args: argparse.Namespace) -> int:
    from pyro_vae.evaluation.report import compare_runs

    print(compare_runs(args.run_dirs))
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "compare": cmd_compare}
