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

``--budget`` scales the passes: stage i trains ``budget * 3^i`` passes,
counted in optimizer steps (at least one a stage; the last stage ends with an
epoch, so the passes in all are rounded to whole epochs), each stage a resumed
run with its ``--lr`` and ``--max-steps``; 1.0 is the full schedule (for a
GPU).  The default 0.0012 comes to 4 passes: stages of 3, 9, 27, 81, 243, 729
and 2187 steps, then the rest of 4 epochs (6721 steps) at the last rate.  A
scaled run is a smaller experiment, not a reproduction: its table says so, and
how many passes it trained.

Measured on one torch thread of a 2-core CPU (AMD EPYC, torch 2.13), per
optimizer step at k = 1, 5, 50: 8.7, 12 and 57 ms with one stochastic layer,
16, 22 and 78 ms with two (the VAE and IWAE alike); validation at the end of an
epoch 0.3-17 s; evaluation at K = 5000: 76 ms a test point with one stochastic
layer, 210 ms with two.  At the defaults (4 passes, the first 1,000 test
points) a cell takes, training and evaluation, 2.9, 3.6 and 11.6 minutes at
k = 1, 5, 50 with one stochastic layer (of which 1.3 evaluating), 6.4, 7.5 and
17.8 minutes with two (3.5 evaluating): 90 minutes of one thread for the ten
cells, by those step times.  ``--jobs 2`` splits them into two workers; in the
run of docs/results.md its workers used 31.9 and 30.8 minutes of CPU time, so
the whole table takes about 32 minutes on two free cores:

    python experiments/burda_table.py --jobs 2 --out runs/burda

The full schedule (``--budget 1``, 820 times the passes) is for a GPU.
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
#: The default scale of the schedule, and the test points evaluated (see the module's docstring).
BUDGET = 0.0012
EVAL_POINTS = 1000
#: 50,000 training images in batches of 20.
STEPS_PER_EPOCH = 2500
#: Measured on one torch thread of a 2-core CPU (AMD EPYC, torch 2.13): seconds per optimizer step
#: and per validation (10,000 images, at the end of each epoch), by (stochastic layers, k), the VAE's
#: and IWAE's alike; seconds per test point of the evaluation at K = 5000, by stochastic layers; and
#: seconds to set up each resumed stage.
STEP_SECONDS = {(1, 1): 0.0087, (1, 5): 0.012, (1, 50): 0.057, (2, 1): 0.016, (2, 5): 0.022, (2, 50): 0.078}
VALID_SECONDS = {(1, 1): 0.3, (1, 5): 1.4, (1, 50): 9.5, (2, 1): 0.4, (2, 5): 2.2, (2, 50): 17.2}
EVAL_SECONDS = {1: 0.076, 2: 0.21}
STAGE_SECONDS = 1.5


def schedule(budget: float) -> list[tuple[float, float]]:
    """``(passes, lr)`` per stage: ``budget * 3^i`` passes at ``1e-3 * 10^(-i/7)``, for i = 0..7, so
    that the passes add up to ``budget * 3280``.  A stage may be a fraction of an epoch: the cell
    trains it in optimizer steps (:func:`common.stage_ends`: each stage at least one step, the
    last ending with an epoch)."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"--budget must be a positive fraction of the {FULL_PASSES} passes, got {budget!r}")
    return [(budget * 3**i, 1e-3 * 10 ** (-i / 7)) for i in range(STAGES)]


def estimated_seconds(cell: common.Cell, passes: float, points: int) -> float:
    """Seconds ``cell`` takes on one thread, from the times measured above: its training steps
    (``passes`` whole epochs), a validation at the end of each epoch, the set-up of each stage, and
    the evaluation of ``points`` test points at K = 5000.  Balances the workers of ``--jobs``."""
    layers, k = cell.labels["layers"], cell.labels["k"]
    epochs = max(1, round(passes))
    return (passes * STEPS_PER_EPOCH * STEP_SECONDS[layers, k] + epochs * VALID_SECONDS[layers, k]
            + points * EVAL_SECONDS[layers] + STAGES * STAGE_SECONDS)


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
                    stages = [(0.4, 1e-3), (1.6, 1e-3 * 10 ** (-1 / 7))]  # stops mid-epoch, 2 passes in all
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
    trained = sorted({round(row["passes"], 3) for row in results.cells.values() if "passes" in row})
    passes = (" or ".join(f"{p:g}" for p in trained) if trained else
              f"about {max(1, round(settings['budget'] * FULL_PASSES))}")  # no cell yet
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


def parser() -> common.ExperimentParser:
    p = common.experiment_parser(__doc__.split("\n\n")[0], "burda", eval_points=EVAL_POINTS)
    p.add_argument("--budget", type=float, default=BUDGET,
                   help=f"fraction of the {FULL_PASSES} passes of the published schedule (default {BUDGET}: "
                        f"{BUDGET * FULL_PASSES:.3g} passes, rounded to whole epochs in all; 1.0 is the full schedule)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    schedule(args.budget)  # a bad budget fails before any training
    results = common.Results(args.out, "burda", args)
    whole_epochs = [key for key, row in results.cells.items() if "passes" not in row]
    if whole_epochs:
        raise SystemExit(f"{results.path} holds cells trained in stages of whole epochs ({', '.join(whole_epochs)}), "
                         "not in the steps this script trains; use another --out")
    passes = 2 if args.smoke else max(1, round(args.budget * FULL_PASSES))
    points = common.SMOKE_EVAL["num_points"] if args.smoke else args.eval_points or 10_000
    common.run_cells(cells(args), results, args, after=write_tables,
                     cost=lambda cell: estimated_seconds(cell, passes, points))
    print(f"wrote {results.path} and {results.out / common.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
