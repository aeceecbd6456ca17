"""``pyro-vae compare RUN_DIR...``: evaluated runs side by side."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table of several evaluated runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")


def run(args: argparse.Namespace) -> int:
    from pyro_vae.evaluation.report import compare_runs

    print(compare_runs(args.run_dirs))
    return 0
