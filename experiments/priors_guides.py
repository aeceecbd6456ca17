"""Experiment: priors and guides on static binarized MNIST -- the standard normal, mixture, VampPrior and
flow priors, each with the diagonal Gaussian and the IAF guide -- beside the VampPrior paper's numbers.

One architecture for all (784-300-300-40, ReLU, Bernoulli decoder; Tomczak &
Welling 2018 use 300-300 gated layers and 40 latents), trained the same number
of epochs with a linear KL warm-up (``--epochs``, ``--warmup-epochs``), then
the test log-likelihood with K = 5000.  The pairing ``--prior vamp --guide iaf``
is refused by the library (a VampPrior scores codes under the guide at every
pseudo-input, which an IAF can only do by inverting itself); its row says why.

    python experiments/priors_guides.py --epochs 10 --out runs/priors-guides
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from pyro_vae.models.config import REFUSED_PAIRS  # noqa: E402

PRIORS = ("normal", "mixture", "vamp", "flow")
GUIDES = ("diagonal", "iaf")
#: Tomczak & Welling (2018), static binarized MNIST, one stochastic layer, K = 5000.
PUBLISHED = {("vamp", "diagonal"): -85.57}
SMOKE_CELLS = ("normal-diagonal", "vamp-diagonal", "flow-iaf")
ARCHITECTURE = {"hidden": [300, 300], "latent_dim": 40, "batch_size": 100, "pseudo_inputs": 500}


def cells(args) -> list[common.Cell]:
    out = []
    for prior in PRIORS:
        for guide in GUIDES:
            if (prior, guide) in REFUSED_PAIRS:
                continue
            if args.smoke:
                options = {**common.smoke_options(), "pseudo_inputs": 5, "flow_hidden": 8, "mixture_components": 3}
            else:
                options = {"data": "binarized-mnist", "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                           **ARCHITECTURE}
            options.update(prior=prior, guide=guide, objective="trace")
            out.append(common.Cell(f"{prior}-{guide}", options, labels={"prior": prior, "guide": guide}))
    return common.smoke_cells(out, SMOKE_CELLS) if args.smoke else out


def write_tables(results: common.Results) -> None:
    rows = []
    for prior in PRIORS:
        for guide in GUIDES:
            if (prior, guide) in REFUSED_PAIRS:
                rows.append([prior, guide, "refused: " + REFUSED_PAIRS[(prior, guide)].split(":", 1)[1].split(";")[0]
                             .strip(), "", "", "", ""])
                continue
            row = results.cells.get(f"{prior}-{guide}")
            if row is None:
                continue
            published = PUBLISHED.get((prior, guide))
            rows.append([prior, guide, common.estimate(row, "log_likelihood"), common.estimate(row, "elbo"),
                         common.fmt(row["kl"]["mean"]), row["active_units"],
                         "" if published is None else f"{published:.2f}"])
    first = next(iter(results.cells.values()), None)
    where = ("no cells yet" if first is None else
             f"{first['epochs']} epochs; test log p(x) with K = {first['eval_particles']} on {first['test_points']} "
             "test points")
    text = ("# Priors and guides\n\n" + common.provenance(results)
            + f"\n{where}.  Published: Tomczak & Welling (2018), static binarized MNIST, after hundreds of "
            "epochs; the rows here are a short budget and are compared with each other, not with the paper.\n\n"
            + common.table(["prior", "guide", "test log p(x)", "test ELBO", "KL", "active units",
                            "published log p(x)"], rows, "lllrrrr"))
    results.write_markdown(text)


def main(argv: list[str] | None = None) -> int:
    parser = common.experiment_parser(__doc__.split("\n\n")[0], "priors-guides")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per pair (default 10)")
    parser.add_argument("--warmup-epochs", type=float, default=2.0,
                        help="linear KL warm-up over this many epochs (default 2)")
    args = parser.parse_args(argv)
    results = common.Results(args.out, "priors-guides", args)
    common.run_cells(cells(args), results, args, after=write_tables)
    print(f"wrote {results.path} and {results.out / common.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
