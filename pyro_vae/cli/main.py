"""The ``pyro-vae`` command: ``train | evaluate | compare | sample``, one module per command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pyro_vae import __version__
from pyro_vae.cli import compare, evaluate, sample, train
from pyro_vae.cli.train import config_from_args  # noqa: F401  (the flags -> TrainConfig step, for tests)
from pyro_vae.data import DataError
from pyro_vae.models.decoders import DataDomainError
from pyro_vae.train.checkpoint import CheckpointError
from pyro_vae.train.trainer import TrainingDiverged

COMMANDS = {"train": train, "evaluate": evaluate, "compare": compare, "sample": sample}
USER_ERRORS = (ValueError, CheckpointError, DataError, DataDomainError, TrainingDiverged, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro model/guide pairs.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except USER_ERRORS as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
