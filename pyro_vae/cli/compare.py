"""``pyro-vae compare RUN_DIR...``: evaluated runs side by side.

Every run that can be shown is shown; a run without numbers (no such
directory, not evaluated, unreadable evaluation) gets a row saying why, and a
stale evaluation or unfinished training is marked in the ``note`` column.
The exit status is 2 only when no run has numbers.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table of several evaluated runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")


def run(args: argparse.Namespace) -> int:
    from pyro_vae.evaluation.report import COMPARE_COLUMNS, compare_rows, format_table

    rows = compare_rows(args.run_dirs)
    columns = COMPARE_COLUMNS if any(r["note"] for r in rows) else COMPARE_COLUMNS[:-1]
    print(format_table(rows, columns))
    if all(r["K"] == "-" for r in rows):
        print("pyro-vae compare: error: none of the runs has an evaluation to compare; run `pyro-vae evaluate "
              "RUN_DIR` first", file=sys.stderr)
        return 2
    return 0
