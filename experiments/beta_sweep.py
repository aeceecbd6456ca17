"""Experiment: a beta sweep and its rate-distortion curve (Alemi et al. 2018), on static binarized MNIST.

beta-VAE (Higgins et al. 2017) trains ``E_q[log p(x | z)] - beta KL(q(z | x) || p(z))``; each beta
lands at one point of the rate-distortion plane: rate R = E[KL(q(z | x) || p(z))], distortion
D = -E_q[log p(x | z)], both in nats on the test set.  beta = 1 is the ELBO, -(D + R); lines of
constant ELBO have slope -1.  The figure ``rate_distortion.png`` plots D against R.

    python experiments/beta_sweep.py --epochs 10 --out runs/beta-sweep
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BETAS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SMOKE_CELLS = ("beta-0.5", "beta-1", "beta-4")
ARCHITECTURE = {"hidden": [400], "latent_dim": 32, "batch_size": 100}


def cells(args) -> list[common.Cell]:
    out = []
    for beta in BETAS:
        options = (common.smoke_options() if args.smoke else
                   {"data": "binarized-mnist", "epochs": args.epochs, **ARCHITECTURE})
        options.update(objective="trace", beta=beta)
        out.append(common.Cell(f"beta-{beta:g}", options, labels={"beta": beta}))
    return common.smoke_cells(out, SMOKE_CELLS) if args.smoke else out


def write_tables(results: common.Results) -> None:
    rows_by_beta = sorted(results.cells.values(), key=lambda r: r["beta"])
    rows = [[f"{r['beta']:g}", common.fmt(r["kl"]["mean"]), common.fmt(-r["reconstruction"]["mean"]),
             common.estimate(r, "elbo"), common.estimate(r, "log_likelihood"), r["active_units"]]
            for r in rows_by_beta]
    first = rows_by_beta[0] if rows_by_beta else None
    where = ("no cells yet" if first is None else
             f"{first['epochs']} epochs; test set ({first['test_points']} points), K = {first['eval_particles']}")
    text = ("# beta sweep: rate and distortion\n\n" + common.provenance(results) + f"\n{where}.\n\n"
            + common.table(["beta", "rate R = KL (nats)", "distortion D (nats)", "test ELBO", "test log p(x)",
                            "active units"], rows)
            + "\n![rate-distortion](rate_distortion.png)\n")
    results.write_markdown(text)
    plot(results, rows_by_beta)


def plot(results: common.Results, rows: list[dict]) -> None:
    if not rows:
        return
    from pyro_vae.evaluation.plots import plt

    rate = [r["kl"]["mean"] for r in rows]
    distortion = [-r["reconstruction"]["mean"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    ax.plot(rate, distortion, marker="o")
    for r, x, y in zip(rows, rate, distortion):
        ax.annotate(f"beta={r['beta']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    best = min(x + y for x, y in zip(rate, distortion))
    span = [0.0, max(rate) * 1.1]
    ax.plot(span, [best - s for s in span], linestyle=":", color="grey", label=f"ELBO = -{best:.1f}")
    ax.set_xlabel("rate R = KL(q(z|x) || p(z)) (nats)")
    ax.set_ylabel("distortion D = -E[log p(x|z)] (nats)")
    ax.set_title("rate-distortion of the beta sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results.out / "rate_distortion.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = common.experiment_parser(__doc__.split("\n\n")[0], "beta-sweep")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per beta (default 10)")
    args = parser.parse_args(argv)
    results = common.Results(args.out, "beta-sweep", args)
    common.run_cells(cells(args), results, args, after=write_tables)
    print(f"wrote {results.path} and {results.out / common.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
