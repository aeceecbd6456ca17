"""Experiment: the ELBO estimators side by side on static binarized MNIST, one architecture.

Every estimator trains the same model -- the one-stochastic-layer architecture
of Burda et al. (2016): 784-200-200-50 with tanh units, Bernoulli decoder,
diagonal Gaussian guide -- for the same number of epochs (``--epochs``, Adam
at 1e-3, batch 100), and is evaluated on the test set with ``K = 5000``
importance samples (``--eval-particles``): test log-likelihood, test ELBO,
active units, seconds per epoch, and the training curves.  Then the gradient
signal-to-noise ratio of the guide's and the model's parameters as ``K``
grows (Rainforth et al. 2018), at the parameters of the trained ``iwae``
``K = 5`` run.

Estimators (``K`` draws per point; ``M x L`` for the grouped ones):

* ``trace``, ``meanfield``, ``stl`` at K = 1; ``stl`` also at 5 and 50;
* ``renyi`` (alpha = 0.5), ``iwae``, ``iwae-dreg`` at K = 5 and 50;
* ``miwae`` and ``piwae`` at 5 x 10 = 50 (Rainforth et al.'s M groups of L).

    python experiments/estimators.py --epochs 10 --out runs/estimators

writes ``results.json``, ``results.md``, ``curves.png`` and ``snr.png`` under
``--out``; started again it continues where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

#: (objective, particles L, groups M, extra options): the cells, in table order.
ESTIMATORS: list[tuple[str, int, int | None, dict[str, Any]]] = [
    ("trace", 1, None, {}),
    ("meanfield", 1, None, {}),
    ("stl", 1, None, {}),
    ("stl", 5, None, {}),
    ("stl", 50, None, {}),
    ("renyi", 5, None, {"alpha": 0.5}),
    ("renyi", 50, None, {"alpha": 0.5}),
    ("iwae", 5, None, {}),
    ("iwae", 50, None, {}),
    ("iwae-dreg", 5, None, {}),
    ("iwae-dreg", 50, None, {}),
    ("miwae", 10, 5, {}),
    ("piwae", 10, 5, {}),
]
#: Estimators and numbers of draws K of the SNR figure.
SNR_OBJECTIVES = ("trace", "stl", "iwae", "iwae-dreg", "miwae", "piwae")
SNR_PARTICLES = (1, 5, 10, 50)
SNR_DRAWS = 200
SMOKE_PARTICLES = {1: 1, 5: 2, 10: 2, 50: 3}
SMOKE_CELLS = ("trace-1", "stl-1", "iwae-2", "iwae-dreg-2", "piwae-2x2")
SMOKE_SNR = ("iwae", "iwae-dreg")
ARCHITECTURE = {"hidden": [200, 200], "latent_dim": 50, "activation": "tanh", "batch_size": 100}


def cells(args) -> list[common.Cell]:
    out = []
    for objective, particles, groups, extra in ESTIMATORS:
        if args.smoke:  # the same cells, small
            particles = SMOKE_PARTICLES[particles]
            groups = None if groups is None else 2
        options = {**(common.smoke_options() if args.smoke else
                      {"data": "binarized-mnist", "epochs": args.epochs, **ARCHITECTURE}),
                   "objective": objective, "particles": particles, **extra}
        if groups is not None:
            options["groups"] = groups
        draws = particles * (groups or 1)
        shape = f"{groups} x {particles}" if groups else str(particles)
        key = f"{objective}-{shape.replace(' ', '')}" + (f"-a{extra['alpha']}" if "alpha" in extra else "")
        label = objective + (f" (alpha {extra['alpha']})" if "alpha" in extra else "")
        out.append(common.Cell(key, options, labels={"estimator": label, "K": shape, "draws": draws}))
    return common.smoke_cells(out, SMOKE_CELLS) if args.smoke else out


def write_tables(results: common.Results) -> None:
    rows = []
    for row in results.cells.values():
        last = row["curve"][-1] if row["curve"] else {}
        rows.append([row["estimator"], row["K"], common.estimate(row, "log_likelihood"),
                     common.estimate(row, "elbo"), common.fmt(last.get("valid_bound")),
                     row["active_units"], common.fmt(row["seconds_per_epoch"], 1)])
    first = next(iter(results.cells.values()), None)
    where = (f"{first['test_points']} test points, K = {first['eval_particles']}, {first['epochs']} epochs"
             if first else "no cells yet")
    text = ("# ELBO estimators on one architecture\n\n" + common.provenance(results) + f"\n{where}.\n\n"
            + common.table(["estimator", "K", "test log p(x)", "test ELBO", "final valid bound",
                            "active units", "s / epoch"], rows, "llrrrrr"))
    snr = results.data.get("snr")
    if snr:
        text += "\n## Gradient SNR\n\n" + snr["table"]
    results.write_markdown(text)
    plot_curves(results)


def plot_curves(results: common.Results) -> None:
    """Validation ELBO and validation bound (the objective's own K-draw bound) per epoch, one line
    per cell; colours repeat after ten, so every second ten is dashed."""
    from matplotlib.ticker import MaxNLocator

    from pyro_vae.evaluation.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharex=True)
    for i, row in enumerate(results.cells.values()):
        epochs = [c["epoch"] for c in row["curve"]]
        style = dict(marker="o", markersize=3, linestyle="-" if i < 10 else "--",
                     label=f"{row['estimator']} K={row['K']}")
        axes[0].plot(epochs, [c["valid_elbo"] for c in row["curve"]], **style)
        axes[1].plot(epochs, [c["valid_bound"] for c in row["curve"]], **style)
    for ax, title in zip(axes, ("validation ELBO", "validation bound of the objective")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{title} (nats)")
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(results.out / "curves.png", dpi=110)
    plt.close(fig)


def snr_figure(results: common.Results, args) -> None:
    """The gradient SNR as K grows, at the parameters of the trained ``iwae`` run with the fewest draws."""
    from pyro_vae.evaluation import snr

    if "snr" in results.data:
        return
    missing = [cell.key for cell in cells(args) if cell.key not in results.cells]
    if missing:
        print(f"the gradient-SNR figure waits for the cells {', '.join(missing)}")
        return
    reference = next(row for row in results.cells.values() if row["estimator"] == "iwae")
    run = common.reopen(reference, device=args.device)
    x = run.load_data(args.data_dir).test[: 8 if args.smoke else 64].to(run.device)
    particles = (1, 2) if args.smoke else SNR_PARTICLES
    draws = 10 if args.smoke else SNR_DRAWS
    with common.stopped_cleanly("the gradient-SNR sweep was interrupted"):
        sweep = snr.snr_sweep(run.program.model, run.program.guide, x,
                              objectives=SMOKE_SNR if args.smoke else SNR_OBJECTIVES, particles=particles,
                              draws=draws, seed=args.seed, progress=args.progress)
    snr.write_snr(sweep, results.out, title=f"At the parameters of the trained {reference['key']} run, "
                                            f"{draws} gradient draws on {x.shape[0]} test points.")
    results.set("snr", {"run": reference["key"], "batch": x.shape[0], "draws": draws,
                        "report": snr.snr_report(sweep), "table": snr.snr_table(sweep)})


def main(argv: list[str] | None = None) -> int:
    parser = common.experiment_parser(__doc__.split("\n\n")[0], "estimators")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per estimator (default 10)")
    args = parser.parse_args(argv)
    results = common.Results(args.out, "estimators", args)
    common.run_cells(cells(args), results, args, after=write_tables)
    snr_figure(results, args)
    write_tables(results)
    print(f"wrote {results.path} and {results.out / common.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
