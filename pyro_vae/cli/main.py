"""The ``pyro-vae`` command: ``train | evaluate | compare | sample | snr``, one module per command."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from pyro_vae import __version__
from pyro_vae.cli import compare, evaluate, sample, snr, startup, train
from pyro_vae.cli.arguments import accept_negative_numbers
from pyro_vae.cli.train import config_from_args  # noqa: F401  (the flags -> TrainConfig step, for tests)
from pyro_vae.data import DataError, MissingDataError
from pyro_vae.models.decoders import DataDomainError
from pyro_vae.train.checkpoint import CheckpointError
from pyro_vae.train.trainer import STOP_SIGNALS, Stopped, TrainingDiverged, forget_pending_stops, stop_at_once

COMMANDS = {"train": train, "evaluate": evaluate, "compare": compare, "sample": sample, "snr": snr}
USER_ERRORS = (ValueError, CheckpointError, DataError, DataDomainError, TrainingDiverged, FileNotFoundError)
#: Set to 1 to see the traceback of an unexpected error instead of the one-line summary.
TRACEBACK_ENV_VAR = "PYRO_VAE_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro model/guide pairs.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    accept_negative_numbers(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command.  Exit status: 0 done, 2 a bad input (one line naming it), 1 the machine
    refused (a file that cannot be written, memory), 128+N stopped by signal N."""
    args = build_parser().parse_args(argv)
    startup.restore_defaults()  # the start is over: the handlers below and the defaults take over
    forget_pending_stops()
    with warnings.catch_warnings(), _signals_stop():
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            return COMMANDS[args.command].run(args)
        except USER_ERRORS as e:
            message = str(e) if isinstance(e, MissingDataError) else one_line(str(e))  # its instructions are lines
            print(f"pyro-vae {args.command}: error: {message}", file=sys.stderr)
            return 2
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"pyro-vae {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
            return 1
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                return _unexpected(args.command, e)
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
        except Exception as e:  # not foreseen: one line, and the traceback kept in a file
            return _unexpected(args.command, e)


@contextlib.contextmanager
def _signals_stop():
    """While a command runs, every stop signal of the training loop (SIGTERM, SIGHUP, SIGUSR1/2,
    SIGXCPU: what schedulers send ahead of a limit) raises :class:`Stopped`, so it unwinds, removing
    temporary files and releasing locks, instead of killing the process; Ctrl-C raises
    ``KeyboardInterrupt`` as usual.  The training loop installs its own handlers, which stop after
    the current step and save."""
    previous = {}
    for signum in STOP_SIGNALS:
        if signum == signal.SIGINT:
            continue
        try:
            previous[signum] = signal.signal(signum, stop_at_once)
        except ValueError:  # not the main thread: signals keep their handlers
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_line(message: str) -> str:
    """``message`` as one line: without the table of trace shapes Pyro appends to errors raised
    inside a trace, without printed tensors (torch's validation errors show the offending values),
    and its remaining lines joined."""
    kept = []
    for line in message.splitlines():
        text = line.strip()
        if text == "Trace Shapes:" or text.startswith("tensor("):
            break
        if text:
            kept.append(text)
    return " ".join(kept).rstrip(":").strip() or message.strip()


def _unexpected(command: str, e: Exception) -> int:
    """Report an error no handler foresaw in one line -- its type, message and innermost frame,
    and the file the full traceback was written to -- and return exit status 1 (with
    ``PYRO_VAE_TRACEBACK=1``: raise it, traceback and all)."""
    if os.environ.get(TRACEBACK_ENV_VAR, "") not in ("", "0"):
        raise e
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    try:
        fd, path = tempfile.mkstemp(prefix="pyro-vae-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(e)))
        kept = f"; the traceback is in {path}"
    except OSError:
        kept = f"; set {TRACEBACK_ENV_VAR}=1 to see the traceback"
    print(f"pyro-vae {command}: error: unexpected {type(e).__name__}: {one_line(str(e)) or 'no message'}{where}{kept}",
          file=sys.stderr)
    return 1


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
