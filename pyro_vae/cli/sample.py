"""``pyro-vae sample RUN_DIR``: PNG grids of prior samples and test reconstructions."""

from __future__ import annotations

import argparse

from pyro_vae.cli.arguments import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="PNG grids of samples and reconstructions")
    p.add_argument("run_dir")
    p.add_argument("--num", type=positive_int, default=100, help="number of samples (default 100)")
    p.add_argument("--out", default=None, help="output folder (default: the run directory)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from pyro_vae.evaluation.pictures import write_run_pictures

    for path in write_run_pictures(args.run_dir, out_dir=args.out, num=args.num, data_dir=args.data_dir,
                                   device=args.device, seed=args.seed):
        print(f"wrote {path}")
    return 0


