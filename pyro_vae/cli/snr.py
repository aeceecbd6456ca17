"""``pyro-vae snr RUN_DIR``: signal-to-noise ratio of gradient estimators at a trained run's parameters.

Reopens the run (:func:`~pyro_vae.train.runs.load_run`), takes the first
``--batch-size`` training points as one fixed batch, and for every estimator
in ``--objectives`` at every ``K`` in ``--particles`` draws its gradient
``--draws`` times (:func:`~pyro_vae.evaluation.snr.snr_sweep`).  Writes
``snr.json``, ``snr.md`` and ``snr.png`` (SNR against K, guide and model
panels) into the run directory or ``--out``.
"""

from __future__ import annotations

import argparse
from typing import Callable

#: Estimators and draws per point compared when not chosen.
DEFAULT_OBJECTIVES = ("trace", "stl", "iwae", "iwae-dreg", "miwae", "ciwae", "piwae")
DEFAULT_K = (1, 4, 16, 64)
DEFAULT_DRAWS = 100
DEFAULT_BATCH = 64


def _comma_list(parse: Callable[[str], object], what: str) -> Callable[[str], list]:
    def parse_list(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return [parse(item) for item in items]
    parse_list.__name__ = what
    return parse_list


def _objective(name: str) -> str:
    from pyro_vae.infer.objectives import OBJECTIVES

    if name not in OBJECTIVES:
        raise argparse.ArgumentTypeError(f"unknown objective {name!r}; expected names from {', '.join(OBJECTIVES)}")
    return name


def _at_least_two(text: str) -> int:
    from pyro_vae.cli.arguments import int_at_least

    return int_at_least(text, 2, "an integer >= 2")


def add_parser(sub) -> None:
    from pyro_vae.cli.arguments import device, finite_float, positive_int, seed
    from pyro_vae.infer.objectives import GROUPED_OBJECTIVES

    p = sub.add_parser("snr", help="signal-to-noise ratio of gradient estimators at a trained run's parameters")
    p.add_argument("run_dir")
    p.add_argument("--objectives", type=_comma_list(_objective, "objectives"), default=list(DEFAULT_OBJECTIVES),
                   metavar="NAMES", help=f"comma-separated estimators (default {','.join(DEFAULT_OBJECTIVES)})")
    p.add_argument("--particles", type=_comma_list(positive_int, "positive integers"), default=list(DEFAULT_K),
                   metavar="K,K,...", help="comma-separated draws per data point K, the same total for every "
                                           f"estimator; {'/'.join(GROUPED_OBJECTIVES)} split them into --groups "
                                           f"(default {','.join(map(str, DEFAULT_K))})")
    p.add_argument("--groups", type=positive_int, default=None, metavar="M",
                   help=f"{'/'.join(GROUPED_OBJECTIVES)}: M groups of K/M draws (every K must be a multiple of M; "
                        "default: the largest divisor of K up to sqrt(K))")
    p.add_argument("--draws", type=_at_least_two, default=DEFAULT_DRAWS, metavar="R",
                   help=f"gradient draws per estimator and K (default {DEFAULT_DRAWS})")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH,
                   help=f"the first N training points form the fixed batch (default {DEFAULT_BATCH})")
    p.add_argument("--alpha", type=finite_float, default=None, help="Renyi alpha, for renyi in --objectives")
    p.add_argument("--ciwae-beta", type=finite_float, default=None, metavar="BETA",
                   help="weight of the ELBO in ciwae, in [0, 1] (default 0.5)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the gradient draws (default 0)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--out", default=None, metavar="DIR", help="write the files into DIR (default: the run directory)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _check_fits(run_, particles: list[int], points: int, data) -> None:
    """Refuse a K whose one gradient draw cannot fit in memory, before drawing it."""
    from pyro_vae.train.memory import check_fits, step_floats_per_pair

    built_in = run_.state.get("built_in", True) and not run_.config.program
    per_pair = (step_floats_per_pair(run_.config.model, data.num_features, data.image_shape) if built_in
                else 3 * data.num_features)
    k = max(particles)
    check_fits(4.0 * k * points * per_pair, f"one gradient draw of K={k} particles x {points} points x "
               f"{data.num_features} features", "lower --particles or --batch-size", run_.device)


def run(args: argparse.Namespace) -> int:
    import torch

    from pyro_vae.evaluation.pictures import check_writable
    from pyro_vae.evaluation.snr import snr_sweep, snr_table, write_snr
    from pyro_vae.train.runs import load_run

    run_ = load_run(args.run_dir, device=args.device)
    out = check_writable(args.out or run_.run_dir)  # before the sweep: an output it cannot write costs no draws
    data = run_.load_data(args.data_dir)
    x = data.train[:args.batch_size]
    if data.dynamic_binarization:  # one fixed binarization of the batch, as a training step would draw
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(args.seed))
    y = None if data.train_labels is None else data.train_labels[:args.batch_size].to(run_.device)
    batch = run_.args(x.to(run_.device), y)
    _check_fits(run_, args.particles, x.shape[0], data)
    run_.program.train(True)  # the gradients a training step takes (e.g. relaxed discrete latents)
    results = snr_sweep(run_.program.model, run_.program.guide, *batch, objectives=args.objectives,
                        particles=args.particles, draws=args.draws, groups=args.groups, alpha=args.alpha,
                        ciwae_beta=args.ciwae_beta, seed=args.seed, progress=args.progress)
    title = (f"{data.name}, {run_.checkpoint_path.name} of {run_.run_dir.name}: {x.shape[0]} training points, "
             f"{args.draws} gradient draws, seed {args.seed}")
    print(snr_table(results), end="", flush=True)  # the numbers first, whatever happens to the files
    paths = write_snr(results, out, title=title, run_dir=str(run_.run_dir),
                      checkpoint=str(run_.checkpoint_path), data=data.name, batch_size=x.shape[0],
                      draws=args.draws, seed=args.seed)
    for path in paths:
        print(f"wrote {path}")
    return 0
