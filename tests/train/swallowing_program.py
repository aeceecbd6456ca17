"""A program module whose import loses the exception of a stop signal, as C code can.

An exception raised by a signal handler surfaces wherever Python is; when that is inside an
extension module's initialisation, the module may clear it (Cython modules do, for optional
set-up steps).  Importing this module sends the process SIGTERM and clears the exception the
same way, then offers :func:`slow_program.make`.
"""

from __future__ import annotations

import os
import signal

from slow_program import make  # noqa: F401  (the program)

try:
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as soon as the call returns
except BaseException:  # noqa: S110 - exactly the loss this module stands for
    pass
