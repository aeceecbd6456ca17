"""Experiment: the protocol of Burda et al. (2016), Table 1 -- VAE against IWAE at k = 1, 5, 50,
one and two stochastic layers, on dynamically binarized MNIST -- printed beside the published numbers.

Their setup, as the library runs it:

* data: MNIST, a fresh Bernoulli draw of every training image each epoch
  (``--data mnist-binarized``);
* one stochastic layer: 784-200-200-50 (``--hidden 200 200 --latent-dim 50``);
  two: 784-200-200-100 for z1 and 100-100-50 for z2 (``--stochastic-layers 2
  --latent-dim 100 --top-hidden 100 100 --top-latent-dim 50``); tanh units;
* VAE with k samples: the ELBO averaged over k draws (``--objective trace
  --particles k``); IWAE: the k-sample bound (``--objective iwae``);
* Adam, batch 20, and their schedule: 3^i passes at learning rate
  1e-3 * 10^(-i/7) for i = 0..7 (3280 passes); each stage here is a resumed run
  with its own ``--lr``.  (They use Adam's epsilon 1e-4; the library's fused
  Adam keeps PyTorch's 1e-8.)
* test log-likelihood with k = 5000 importance samples.

``--budget`` scales the passes: 1.0 is the full schedule (for a GPU);
the default 0.003 gives every stage at least one epoch, 10 epochs in all (the
least the eight stages allow).  On one thread of a shared 2-core CPU, with
``--eval-points 1000``, a one-stochastic-layer cell with k = 1 or 5 trains in
2.5-4 minutes and evaluates in about one; the k = 50 cells cost ten times as
much or more, so the whole table takes hours there: ``--cells`` runs a part of
it.  A scaled run is a smaller experiment, not a reproduction: its table says
so.

    python experiments/burda_table.py --budget 0.003 --eval-points 1000 --out runs/burda
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

#: Burda et al. (2016), Table 1: test log p(x) (k = 5000) on dynamically binarized MNIST.
PUBLISHED = {
    (1, "vae", 1): -86.76, (1, "vae", 5): -86.47, (1, "vae", 50): -86.35,
    (1, "iwae", 1): -86.76, (1, "iwae", 5): -85.54, (1, "iwae", 50): -84.78,
    (2, "vae", 1): -85.33, (2, "iwae", 50): -82.90,
}
STAGES = 8
FULL_PASSES = sum(3**i for i in range(STAGES))  # 3280
LAYERS = {
    1: {"hidden": [200, 200], "latent_dim": 50},
    2: {"hidden": [200, 200], "latent_dim": 100, "stochastic_layers": 2, "top_hidden": [100, 100],
        "top_latent_dim": 50},
}
KS = (1, 5, 50)
SMOKE_CELLS = ("1layer-vae-k1", "1layer-iwae-k5", "2layer-iwae-k50")


def schedule(budget: float) -> list[tuple[int, float]]:
    """``(epochs, lr)`` per stage: ``budget * 3^i`` passes at ``1e-3 * 10^(-i/7)``, rounded so that
    the passes add up to ``budget * 3280`` (largest remainders) and every stage keeps at least one
    epoch (taken from the longest stage)."""
    if not budget > 0:
        raise ValueError(f"--budget must be a positive fraction of the {FULL_PASSES} passes, got {budget!r}")
    total = max(STAGES, round(budget * FULL_PASSES))
    share = [total * 3**i / FULL_PASSES for i in range(STAGES)]
    epochs = [math.floor(s) for s in share]
    by_remainder = sorted(range(STAGES), key=lambda i: share[i] - epochs[i], reverse=True)
    for i in by_remainder[:total - sum(epochs)]:
        epochs[i] += 1
    for i in range(STAGES):
        if epochs[i] == 0:
            epochs[i] = 1
            epochs[max(range(STAGES), key=lambda j: (epochs[j], j))] -= 1
    return [(e, 1e-3 * 10 ** (-i / 7)) for i, e in enumerate(epochs)]


def cells(args) -> list[common.Cell]:
    out = []
    for layers, sizes in LAYERS.items():
        for method in ("vae", "iwae"):
            for k in KS:
                if method == "iwae" and k == 1:
                    continue  # IWAE with k = 1 is the VAE with k = 1
                if args.smoke:
                    options = {**common.smoke_options(), "particles": min(k, 2), "batch_size": 64}
                    if layers == 2:
                        options.update(stochastic_layers=2, top_hidden=[16], top_latent_dim=2)
                    stages = [(1, 1e-3), (1, 1e-3 * 10 ** (-1 / 7))]
                else:
                    options = {"data": "mnist-binarized", **sizes, "activation": "tanh", "batch_size": 20,
                               "particles": k}
                    stages = schedule(args.budget)
                options["objective"] = "trace" if method == "vae" else "iwae"
                key = f"{layers}layer-{method}-k{k}"
                out.append(common.Cell(key, options, stages, labels={"layers": layers, "method": method, "k": k}))
    return common.smoke_cells(out, SMOKE_CELLS) if args.smoke else out


def write_tables(results: common.Results) -> None:
    settings = results.data["settings"]
    passes = sum(e for e, _ in schedule(settings["budget"])) if not settings["smoke"] else 2
    rows = []
    for row in results.cells.values():
        published = PUBLISHED.get((row["layers"], row["method"], row["k"]))
        ll = row["log_likelihood"]["mean"]
        rows.append([row["layers"], row["method"].upper(), row["k"], common.estimate(row, "log_likelihood"),
                     "" if published is None else f"{published:.2f}",
                     "" if published is None else f"{ll - published:+.2f}", row["active_units"],
                     common.fmt(row["train_seconds"] / 60, 1)])
    first = next(iter(results.cells.values()), None)
    scaled = settings["smoke"] or settings["budget"] < 1
    where = ("no cells yet" if first is None else
             f"test log p(x) with K = {first['eval_particles']} on {first['test_points']} test points")
    note = (f"**A scaled-down run, not a reproduction**: {passes} passes of the {FULL_PASSES} of the published "
            "schedule" + ("" if first is None or first["test_points"] == 10_000 else
                          ", evaluated on a subset of the test set") + ".\n\n") if scaled else ""
    text = ("# Burda et al. (2016), Table 1 protocol\n\n" + common.provenance(results) + "\n" + note
            + f"{where}; published: Burda et al. (2016), Table 1 (k = 5000 on all 10,000 test images, after "
            f"{FULL_PASSES} passes).\n\n"
            + common.table(["stochastic layers", "method", "k", "test log p(x)", "published", "difference",
                            "active units", "training minutes"], rows, "lllrrrrr"))
    results.write_markdown(text)


def main(argv: list[str] | None = None) -> int:
    parser = common.experiment_parser(__doc__.split("\n\n")[0], "burda")
    parser.add_argument("--budget", type=float, default=0.003,
                        help=f"fraction of the {FULL_PASSES} passes of the published schedule (default 0.003; "
                             "1.0 is the full schedule)")
    args = parser.parse_args(argv)
    schedule(args.budget)  # a bad budget fails before any training
    results = common.Results(args.out, "burda", args)
    common.run_cells(cells(args), results, args, after=write_tables)
    print(f"wrote {results.path} and {results.out / common.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
