"""Experiment: four architectures on one short budget on static binarized MNIST -- the one-layer MLP
VAE, the two-stochastic-layer VAE of Burda et al. (2016) and the convolutional guide and decoder.

Every model trains the same number of epochs (``--epochs``, default 5) with the
same objective (``--objective``, default ``trace``), Adam at 1e-3, batch 100,
and is evaluated on the whole test set (``--eval-particles``, default 1000):

* ``mlp``: 784-400-50 (one stochastic layer, ReLU);
* ``one-layer-tanh``: 784-200-200-50, tanh (Burda et al. 2016's one-layer sizes),
  which separates what the tanh networks cost from what the second layer does;
* ``two-layer``: z1 of 100 from 784-200-200, z2 of 50 from 100-100 (Burda et al.
  2016's two-layer sizes), tanh;
* ``conv``: two strided 4x4 convolutions each way (``--network conv``), 50 latents.

    python experiments/architectures.py --epochs 5 --eval-particles 1000 --out runs/architectures
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ARCHITECTURES = {
    "mlp": {"hidden": [400], "latent_dim": 50},
    "one-layer-tanh": {"hidden": [200, 200], "latent_dim": 50, "activation": "tanh"},
    "two-layer": {"hidden": [200, 200], "latent_dim": 100, "stochastic_layers": 2, "top_hidden": [100, 100],
                  "top_latent_dim": 50, "activation": "tanh"},
    "conv": {"network": "conv", "latent_dim": 50},
}
SMOKE = {"mlp": {"hidden": [16]}, "one-layer-tanh": {"hidden": [16, 16], "activation": "tanh"}, "two-layer": {"hidden": [16], "stochastic_layers": 2, "top_hidden": [8],
                                                  "top_latent_dim": 2}, "conv": {"network": "conv"}}
SMOKE_CELLS = tuple(ARCHITECTURES)


def cells(args) -> list[common.Cell]:
    out = []
    for name, sizes in ARCHITECTURES.items():
        if args.smoke:
            options = {**common.smoke_options(), **SMOKE[name]}
        else:
            options = {"data": "binarized-mnist", "epochs": args.epochs, "batch_size": 100, **sizes}
        options["objective"] = args.objective
        out.append(common.Cell(name, options, labels={"architecture": name}))
    return out


def write_tables(results: common.Results) -> None:
    rows = [[row["architecture"], common.estimate(row, "log_likelihood"), common.estimate(row, "elbo"),
             row["active_units"], common.fmt(row["seconds_per_epoch"], 1), row["epochs"]]
            for row in results.cells.values()]
    first = next(iter(results.cells.values()), None)
    where = ("no cells yet" if first is None else
             f"objective {results.data['settings']['objective']}; test log p(x) with K = {first['eval_particles']} "
             f"on {first['test_points']} test points")
    results.write_markdown("# Architectures on one budget\n\n" + common.provenance(results) + f"\n{where}.\n\n"
                           + common.table(["architecture", "test log p(x)", "test ELBO", "active units",
                                           "s / epoch", "epochs"], rows, "lrrrrr"))


def main(argv: list[str] | None = None) -> int:
    parser = common.experiment_parser(__doc__.split("\n\n")[0], "architectures")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per architecture (default 5)")
    parser.add_argument("--objective", default="trace", help="training objective (default trace)")
    args = parser.parse_args(argv)
    results = common.Results(args.out, "architectures", args)
    common.run_cells(cells(args), results, args, after=write_tables)
    print(f"wrote {results.path} and {results.out / common.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
