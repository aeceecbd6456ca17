"""A stop signal while the ``pyro-vae`` command is still importing torch and Pyro ends it quietly.

Importing the package takes a second or two, before :func:`pyro_vae.cli.main.main`
can install its handlers.  Run as the command line (the ``pyro-vae`` script or
``python -m pyro_vae``), the package first installs :func:`quiet_stops`: Ctrl-C,
SIGTERM, SIGHUP, SIGUSR1/2 or SIGXCPU in that window prints one line and ends
the process with ``128 + N``, as the command does later, instead of a ``KeyboardInterrupt``
traceback from deep inside an import (or, for SIGTERM, a silent kill).  Nothing
has been written yet, so there is nothing to save.  Imported as a library, the
package leaves every handler alone.  Only the standard library is used here, so
that the handlers are in place before anything slow is imported.
"""

from __future__ import annotations

import os
import signal
import sys

#: The signals that stop the command (those of the training loop).
SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGXCPU")


def is_command_line(argv: list[str] | None = None) -> bool:
    """Whether this process is the ``pyro-vae`` command: its script, or ``python -m pyro_vae``
    (``sys.argv[0]`` is ``"-m"`` while the package run by ``-m`` is being imported)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    name = os.path.basename(argv[0])
    return name in ("pyro-vae", "pyro-vae.exe", "-m")


def _stop_quietly(signum: int, frame) -> None:
    # Ends the process at once rather than raising: an exception raised here surfaces inside
    # whatever is being imported, whose C code may clear it and leave a half-imported module
    # behind.  Nothing has been written yet, so there is nothing to unwind.
    name = signal.Signals(signum).name
    os.write(2, f"pyro-vae: stopped by {name} while starting; nothing was written\n".encode())
    os._exit(128 + signum)


def quiet_stops() -> None:
    """Install :func:`_stop_quietly` for every stop signal whose handler is still Python's default
    (a handler someone else installed, or an ignored signal, is kept)."""
    for name in SIGNAL_NAMES:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            try:
                signal.signal(signum, _stop_quietly)
            except ValueError:  # not the main thread
                return


def restore_defaults() -> None:
    """Put Python's own handlers back (``KeyboardInterrupt`` for Ctrl-C, the default action for the
    rest) wherever :func:`quiet_stops` installed one: the command then installs its own, and a
    signal after it has returned meets the defaults, not a message about starting."""
    for name in SIGNAL_NAMES:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is _stop_quietly:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
