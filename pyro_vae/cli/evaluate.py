"""``pyro-vae evaluate RUN_DIR``: test-set log-likelihood, bounds, diagnostics, pictures, report.

``evaluate`` computes the importance-sampled test log-likelihood and every
bound beside it (:mod:`pyro_vae.evaluation.evaluator`), latent and guide diagnostics
(:mod:`pyro_vae.evaluation.diagnostics`), pictures (:mod:`pyro_vae.evaluation.plots`),
optionally exports posterior draws for ArviZ, and writes ``evaluation.json``
and ``evaluation.md`` into the run (:mod:`pyro_vae.evaluation.report`); the work is
:func:`pyro_vae.evaluation.run.evaluate`.  Under ``torchrun`` the processes share
out the test set and rank 0 writes and prints the report.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub) -> None:
    from pyro_vae.cli.arguments import device, finite_float, non_negative_int, positive_float, positive_int, seed
    from pyro_vae.evaluation.evaluator import (
        DEFAULT_IWAE_KS,
        DEFAULT_PARTICLES,
        DEFAULT_RENYI_ALPHAS,
    )
    from pyro_vae.evaluation.importance import DEFAULT_MAX_MEMORY_MB
    from pyro_vae.evaluation.run import DEFAULT_POSTERIOR_SAMPLES

    p = sub.add_parser("evaluate", help="test log-likelihood, bounds, diagnostics, pictures and a report")
    p.add_argument("run_dir")
    p.add_argument("--particles", type=positive_int, default=DEFAULT_PARTICLES,
                   help=f"importance samples K per test point (default {DEFAULT_PARTICLES}, as in Burda et al.)")
    p.add_argument("--max-memory", type=positive_float, default=DEFAULT_MAX_MEMORY_MB, metavar="MB",
                   help=f"memory budget of one chunk of the computation, in MB (default {DEFAULT_MAX_MEMORY_MB:g})")
    p.add_argument("--seed", type=seed, default=0, help="seed of the importance draws (default 0)")
    p.add_argument("--num-points", type=positive_int, default=None, metavar="N",
                   help="evaluate only the first N test points (quick looks)")
    p.add_argument("--iwae-k", type=positive_int, nargs="+", default=list(DEFAULT_IWAE_KS), metavar="K",
                   help=f"IWAE bounds to report, from the same draws (default {' '.join(map(str, DEFAULT_IWAE_KS))})")
    p.add_argument("--alphas", type=finite_float, nargs="+", default=list(DEFAULT_RENYI_ALPHAS), metavar="ALPHA",
                   help=f"Renyi bounds to report (default {' '.join(map(str, DEFAULT_RENYI_ALPHAS))})")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no pictures")
    p.add_argument("--export-posterior", type=non_negative_int, nargs="+", default=None, metavar="IDX",
                   help="test indices whose guide draws are saved as ArviZ netCDF (posterior.nc)")
    p.add_argument("--posterior-samples", type=positive_int, default=DEFAULT_POSTERIOR_SAMPLES,
                   help=f"draws per exported input (default {DEFAULT_POSTERIOR_SAMPLES})")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the report and pictures into DIR (default: the run directory)")
    p.add_argument("--allow-changed-data", action="store_true",
                   help="evaluate on data that differs from the data the run was trained on (with a warning)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pyro_vae.evaluation.run import evaluate, report_json
    from pyro_vae.train.distributed import current_rank

    report = evaluate(args.run_dir, args.particles, num_points=args.num_points, iwae_ks=args.iwae_k,
                      alphas=args.alphas, max_memory_mb=args.max_memory, seed=args.seed, plots_=args.plots,
                      export_indices=args.export_posterior, posterior_samples=args.posterior_samples,
                      data_dir=args.data_dir, device=args.device, progress=args.progress,
                      allow_changed_data=args.allow_changed_data, out_dir=args.out)
    if current_rank() != 0:  # another rank of a distributed evaluation: rank 0 writes and reports
        return 0
    print_summary(report)
    for path in report["report_files"]:
        print(f"wrote {path}")
    for path in report["pictures"].values():
        print(f"picture: {path}")
    if report["posterior_export"]:
        print(f"posterior draws: {report['posterior_export']['path']}")
    for path, reason in report.get("write_errors", []):
        print(f"pyro-vae evaluate: warning: could not write {path}: {reason}", file=sys.stderr)
    if not report["report_files"]:
        print("pyro-vae evaluate: error: the report could not be written; here it is:", file=sys.stderr)
        print(report_json(report))
        return 1
    return 1 if report.get("write_errors") else 0


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
