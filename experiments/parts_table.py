"""Validation bounds of every prior x guide (plus cVAE and discrete rows) under each objective.

Every cell trains the same small VAE for the same short budget with
``pyro_vae.train.trainer.Trainer`` and reports the validation bound of its own
objective (nats per image; higher is better) in eval mode, i.e. what the
trainer writes to ``metrics.jsonl`` as ``valid_bound``:

* ``trace``      Monte Carlo ELBO, 1 particle
* ``meanfield``  ELBO with the analytic KL where one is registered for the pair;
  ``MC fallback`` marks cells where TraceMeanField_ELBO used a Monte Carlo KL
* ``iwae``       IWAE bound, K = 5
* ``renyi``      Renyi bound, alpha = 0.5, K = 5

A second table gives the 1-particle validation ELBO of the same runs, which is
comparable across columns.  Rows: the 20 continuous prior x guide pairs on
static binarized MNIST, the discrete latents (relaxed and straight-through) on
the same data, and the cVAE with its unconditional baseline on dynamically
binarized MNIST (static binarized MNIST has no labels).

Usage (see experiments/run_parts_table.sh):

    python experiments/parts_table.py --data-dir path/to/data --estimate   # timing only
    python experiments/parts_table.py --data-dir path/to/data --out experiments/parts_table.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pyro_vae.data import Dataset, load_dataset
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.trainer import Trainer

PRIORS = ("normal", "learned-normal", "mixture", "vamp", "flow")
GUIDES = ("diagonal", "lowrank", "full", "iaf")
OBJECTIVES = {
    "trace": dict(objective="trace"),
    "meanfield": dict(objective="meanfield"),
    "iwae K=5": dict(objective="iwae", particles=5),
    "renyi a=0.5 K=5": dict(objective="renyi", particles=5, alpha=0.5),
}
STATIC, LABELLED = "binarized-mnist", "mnist-binarized"


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    data: str
    options: dict


def table_rows() -> list[Row]:
    rows = [Row(f"{p} x {g}", STATIC, dict(prior=p, guide=g)) for p in PRIORS for g in GUIDES]
    rows.append(Row("discrete: categorical (relaxed)", STATIC, dict(prior="categorical", guide="categorical")))
    rows.append(Row("discrete: categorical (straight-through)", STATIC,
                    dict(prior="categorical", guide="categorical", straight_through=True)))
    rows.append(Row("normal x diagonal, unconditional (dyn. binarized)", LABELLED, {}))
    rows.append(Row("cVAE: normal x diagonal (dyn. binarized)", LABELLED, dict(conditional=True)))
    return rows


def subset(dataset: Dataset, train_size: int, valid_size: int) -> Dataset:
    """The first ``train_size`` training and ``valid_size`` validation examples (labels kept)."""
    def cut(t, n):
        return None if t is None else t[:n]
    return dataclasses.replace(
        dataset, train=dataset.train[:train_size], valid=dataset.valid[:valid_size],
        test=dataset.test[:valid_size], train_labels=cut(dataset.train_labels, train_size),
        valid_labels=cut(dataset.valid_labels, valid_size), test_labels=cut(dataset.test_labels, valid_size))


def base_config(args: argparse.Namespace) -> dict:
    return dict(latent_dim=args.latent_dim, hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, patience=0, seed=args.seed, device="cpu", progress=False,
                flow_hidden=args.flow_hidden, flow_steps=args.flow_steps, pseudo_inputs=args.pseudo_inputs,
                mixture_components=args.mixture_components, guide_rank=args.guide_rank,
                num_categories=args.num_categories, temperature=1.0, temperature_min=0.5,
                temperature_anneal=args.temperature_anneal)


def run_cell(row: Row, objective: dict, dataset: Dataset, args: argparse.Namespace, root: Path) -> dict:
    """Train one cell and return its validation numbers (or the error that stopped it)."""
    run_dir = root / f"{row.label}-{objective['objective']}".replace(" ", "_").replace(":", "").replace(",", "")
    config = TrainConfig.from_flat(dict(data=row.data, run_dir=str(run_dir), **base_config(args), **row.options, **objective))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the meanfield fallback is recorded from trainer.analytic_kl
            trainer = Trainer(config, dataset=dataset)
            result = trainer.fit()
    except Exception as e:  # one failing cell must not lose the table
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
    last = result.history[-1]
    return {"bound": last["valid_bound"], "elbo": last["valid_elbo"], "seconds": time.perf_counter() - start,
            "analytic_kl": all(trainer.analytic_kl.values()) if trainer.analytic_kl else None}


def cell_text(result: dict | None, key: str, objective: str) -> str:
    if result is None:
        return "not run"
    if "error" in result:
        return "n/a: " + " ".join(result["error"].split())[:80]  # one line, so the table stays a table
    text = f"{result[key]:.2f}"
    if key == "bound" and objective == "meanfield" and result.get("analytic_kl") is False:
        text = f"MC fallback: {text}"
    return text


def markdown(rows: list[Row], results: dict, args: argparse.Namespace, seconds: float) -> str:
    steps = math.ceil(args.train_size / args.batch_size) * args.epochs
    header = (
        f"Validation bounds in nats per image (higher is better) after the same short training: "
        f"{args.epochs} epoch(s) over the first {args.train_size} training images ({steps} Adam steps, batch "
        f"{args.batch_size}, lr {args.lr}), evaluated on the first {args.valid_size} validation images in eval "
        f"mode. MLP {args.hidden} with latent_dim={args.latent_dim} (discrete rows: {args.latent_dim} categorical "
        f"latents x {args.num_categories} categories, temperature 1.0 -> 0.5 at rate {args.temperature_anneal}/epoch, "
        f"evaluated as the exact discrete model); mixture {args.mixture_components} components, VampPrior "
        f"{args.pseudo_inputs} pseudo-inputs, flows {args.flow_steps} steps x {args.flow_hidden} hidden units, "
        f"low-rank guide rank {args.guide_rank}; seed {args.seed}. Data: static binarized MNIST "
        f"(Larochelle & Murray) except rows marked dyn. binarized (MNIST with labels, Burda et al. dynamic "
        f"binarization; valid split binarized once). Such short runs are far from converged (converged VAEs on "
        f"static binarized MNIST reach about -89 with larger networks, Burda et al. 2015): compare cells, not "
        f"literature. Training and validation took {seconds / 60:.1f} min in all "
        f"(sum over cells) on a shared CPU ({torch.get_num_threads()} threads)."
    )
    names = list(OBJECTIVES)
    lines = [header, "", "Bound of the training objective (meanfield: `MC fallback` = no analytic KL "
             "registered for the pair, so TraceMeanField_ELBO estimated the KL by Monte Carlo, with a warning):", "",
             "| prior x guide | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {row.label} | " + " | ".join(
            cell_text(results.get((row.label, n)), "bound", OBJECTIVES[n]["objective"]) for n in names) + " |")
    lines += ["", "1-particle validation ELBO of the same runs (comparable across columns):", "",
              "| prior x guide | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {row.label} | " + " | ".join(
            cell_text(results.get((row.label, n)), "elbo", OBJECTIVES[n]["objective"]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def load_results(path: str, rerun: set[str]) -> dict:
    """Cells of an earlier run, keyed ``(row, objective)``, without the rows about to be rerun."""
    results = {}
    for line in Path(path).read_text().splitlines():
        cell = json.loads(line)
        row, name = cell.pop("row"), cell.pop("objective")
        if row not in rerun:
            results[(row, name)] = cell
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with binarized-mnist/ and mnist/")
    p.add_argument("--out", default="experiments/parts_table.md", help="Markdown file to write")
    p.add_argument("--results", default=None, help="JSON lines of every cell (default: OUT with .jsonl)")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--valid-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[200])
    p.add_argument("--flow-hidden", type=int, default=32)
    p.add_argument("--flow-steps", type=int, default=2)
    p.add_argument("--pseudo-inputs", type=int, default=20)
    p.add_argument("--mixture-components", type=int, default=10)
    p.add_argument("--guide-rank", type=int, default=2)
    p.add_argument("--num-categories", type=int, default=10)
    p.add_argument("--temperature-anneal", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="*", default=None, help="only rows whose label contains one of these strings")
    p.add_argument("--reuse", default=None, metavar="JSONL",
                   help="cells of an earlier run (its --results file) for the rows not selected by --rows; "
                        "the table then shows every row")
    p.add_argument("--estimate", action="store_true",
                   help="time one batch-sized epoch per cell and print the projected total, training nothing else")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    all_rows = table_rows()
    rows = [r for r in all_rows if not args.rows or any(s in r.label for s in args.rows)]
    data = {name: load_dataset(name, args.data_dir) for name in {r.data for r in rows}}
    if args.estimate:
        return estimate(rows, data, args)
    data = {name: subset(d, args.train_size, args.valid_size) for name, d in data.items()}
    out = Path(args.out)
    results_path = Path(args.results) if args.results else out.with_suffix(".jsonl")
    results = load_results(args.reuse, {r.label for r in rows}) if args.reuse else {}
    with tempfile.TemporaryDirectory() as tmp, results_path.open("w") as log:
        for (label, name), cell in results.items():  # reused cells first, so the file is complete
            log.write(json.dumps({"row": label, "objective": name, **cell}) + "\n")
        for row in rows:
            for name, objective in OBJECTIVES.items():
                result = run_cell(row, objective, data[row.data], args, Path(tmp))
                results[(row.label, name)] = result
                log.write(json.dumps({"row": row.label, "objective": name, **result}) + "\n")
                log.flush()
                print(f"{row.label:50s} {name:16s} {cell_text(result, 'bound', objective['objective']):>24s} "
                      f"({result['seconds']:.0f} s)", flush=True)
    shown = [r for r in all_rows if any(key[0] == r.label for key in results)]
    cell_seconds = sum(cell.get("seconds", 0.0) for cell in results.values())
    text = markdown(shown, results, args, cell_seconds)
    if args.reuse:
        text += (f"\nRows {', '.join(r.label for r in rows)} were (re)run by this command; the others are "
                 f"reused from {args.reuse} (same settings).\n")
    out.write_text(text)
    print(text)
    return 0


def estimate(rows: list[Row], data: dict, args: argparse.Namespace) -> int:
    """Time a few training steps and one validation pass per cell; project to the full budget."""
    from pyro_vae.train.trainer import batch_args, evaluate_loss

    steps = math.ceil(args.train_size / args.batch_size) * args.epochs
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            dataset = subset(data[row.data], args.batch_size, args.valid_size)
            line = []
            for name, objective in OBJECTIVES.items():
                config = TrainConfig.from_flat(dict(data=row.data, run_dir=str(Path(tmp) / f"{len(line)}"), **base_config(args),
                                     **row.options, **objective))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trainer = Trainer(config, dataset=dataset)
                x, y = trainer.x_train, trainer.y_train
                timings = []
                for _ in range(4):  # the first step warms up
                    t0 = time.perf_counter()
                    loss = trainer.loss_fn(trainer.program.model, trainer.program.guide, *batch_args(x, y)) / x.shape[0]
                    trainer.optimizer.zero_grad()
                    loss.backward()
                    trainer.optimizer.step()
                    timings.append(time.perf_counter() - t0)
                per_step = min(timings[1:])
                trainer.program.train(False)
                t0 = time.perf_counter()
                evaluate_loss(trainer.valid_elbo_fn, trainer.program, trainer.x_valid, trainer.y_valid)
                if objective["objective"] != "trace":
                    evaluate_loss(trainer.loss_fn, trainer.program, trainer.x_valid, trainer.y_valid)
                validation = time.perf_counter() - t0
                projected = per_step * steps + validation * args.epochs
                total += projected
                line.append(f"{name} {projected:5.0f} s")
            print(f"{row.label:50s} " + "  ".join(line), flush=True)
    print(f"projected total: {total / 60:.1f} min for {steps} steps per cell (best-case step times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
