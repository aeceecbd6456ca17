"""``pyro-vae sample RUN_DIR``: PNG grids of prior samples and test reconstructions.

Samples are drawn and written a page (at most 100 samples) at a time, so any
``--num`` needs the memory of one page.
"""

from __future__ import annotations

import argparse

from pyro_vae.cli.arguments import device, positive_int, seed


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="PNG grids of samples and reconstructions")
    p.add_argument("run_dir")
    p.add_argument("--num", type=positive_int, default=100,
                   help="number of samples (default 100); more than 100 are written as pages samples-0001.png, ...")
    p.add_argument("--out", default=None, help="output folder (default: the run directory)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--allow-changed-data", action="store_true",
                   help="use data that differs from the data the run was trained on (with a warning)")


def run(args: argparse.Namespace) -> int:
    from pyro_vae.evaluation.pictures import write_run_pictures

    paths = write_run_pictures(args.run_dir, out_dir=args.out, num=args.num, data_dir=args.data_dir,
                               device=args.device, seed=args.seed, allow_changed_data=args.allow_changed_data)
    samples = [p for p in paths if p.name.startswith("samples")]
    if len(samples) > 3:
        print(f"wrote {len(samples)} pages of samples: {samples[0]} ... {samples[-1]}")
        paths = [p for p in paths if p not in samples]
    for path in paths:
        print(f"wrote {path}")
    return 0
