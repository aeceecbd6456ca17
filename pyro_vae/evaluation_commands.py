"""``pyro-vae evaluate``: the command-line side of :mod:`pyro_vae.evaluation`."""

from __future__ import annotations

import argparse
import json
import time

import torch


def add_parsers(sub) -> None:
    from .cli import positive_int

    p = sub.add_parser("evaluate", help="test-set bounds of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--particles", type=positive_int, default=100, help="particles per data point (default 100)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=500)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import test_set_bounds
    from .runs import load_run

    run = load_run(args.run_dir, args.device)
    data = run.load_data(args.data_dir)
    device = next(run.vae.parameters()).device
    x = data.test.to(device)
    y = data.test_labels.to(device) if run.config.conditional else None
    run.vae.decoder.check_data(x, f"{data.name} test data")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bounds = test_set_bounds(run.vae, x, y, num_particles=args.particles, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    report = {"run_dir": str(run.run_dir), "data": data.name, "test_points": x.shape[0],
              "particles": args.particles, "seconds": seconds, "bounds": bounds}
    (run.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{data.name} test set, {x.shape[0]} points, K={args.particles} ({seconds:.1f} s)")
    for name, est in bounds.items():
        print(f"  {name:15s} {est['mean']:10.3f} +- {est['stderr']:.3f} nats")
    print(f"wrote {run.run_dir / 'evaluation.json'}")
    return 0


COMMANDS = {"evaluate": cmd_evaluate}
