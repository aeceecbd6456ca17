"""The ``pyro-vae`` command: ``train | evaluate | compare | sample | snr``, one module per command."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from pyro_vae import __version__
from pyro_vae.cli import compare, evaluate, sample, snr, train
from pyro_vae.cli.train import config_from_args  # noqa: F401  (the flags -> TrainConfig step, for tests)
from pyro_vae.data import DataError
from pyro_vae.models.decoders import DataDomainError
from pyro_vae.train.checkpoint import CheckpointError
from pyro_vae.train.trainer import Stopped, TrainingDiverged

COMMANDS = {"train": train, "evaluate": evaluate, "compare": compare, "sample": sample, "snr": snr}
USER_ERRORS = (ValueError, CheckpointError, DataError, DataDomainError, TrainingDiverged, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro model/guide pairs.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.  Exit status: 0 done, 2 a bad input (one line naming it), 1 the machine
    refused (a file that cannot be written, memory), 128+N stopped by signal N."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), _signals_stop():
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            return COMMANDS[args.command].run(args)
        except USER_ERRORS as e:
            print(f"pyro-vae {args.command}: error: {_without_trace_shapes(str(e))}", file=sys.stderr)
            return 2
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"pyro-vae {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
            return 1
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            print(f"pyro-vae {args.command}: error: out of memory ({str(e).splitlines()[0] if str(e) else 'no detail'});"
                  " lower the sizes, particles or batch size", file=sys.stderr)
            return 1
        except Stopped as e:
            print(f"pyro-vae {args.command}: stopped by {signal.Signals(e.signum).name}; nothing half-written "
                  "was left", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print("aborted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _signals_stop():
    """While a command runs, SIGTERM and SIGHUP raise :class:`Stopped` (the training loop installs
    its own handlers, which stop after the current step and save)."""
    def stop(signum, frame):
        raise Stopped(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, stop)
        except ValueError:  # not the main thread: signals keep their handlers
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _without_trace_shapes(message: str) -> str:
    """A message without the table of trace shapes Pyro appends to errors raised inside a trace."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Trace Shapes:":
            return "\n".join(lines[:i]).rstrip()
    return message


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ()))
            or "can't allocate memory" in text or "out of memory" in text)


def _one_line_warnings(command: str, default: Callable) -> Callable:
    """Show pyro-vae's own warnings as ``pyro-vae COMMAND: warning: ...`` lines; others as usual."""
    package = str(Path(__file__).resolve().parent.parent)

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("pyro_vae") or str(filename).startswith(package):
            print(f"pyro-vae {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show
