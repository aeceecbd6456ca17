"""Run directories: unique default names, one writer at a time, and what a killed writer left.

* :func:`create_unique_run_dir` makes ``runs/DATA-OBJECTIVE-TIME-SUFFIX`` with
  ``mkdir(exist_ok=False)``, so two runs started in the same second never share
  a directory.
* :class:`RunLock` holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` while
  a process writes the run; a second writer gets :class:`RunDirBusy` naming the
  holder's pid.  The operating system releases the lock when the holder exits,
  however it exits, so a killed run never leaves a stale lock.
* :func:`remove_stale_temporaries` deletes the ``*.tmp`` files of atomic writes
  that a killed process did not finish (call it while holding the lock).
* ``status.json`` says what the writer is doing (training, interrupted,
  finished, diverged), for ``compare``; :func:`run_status` reads it and tells
  a live writer from a dead one by the lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from pyro_vae.data.paths import new_file_mode

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None

LOCK = ".lock"
STATUS = "status.json"
#: Files a pyro-vae run directory may hold besides pictures and reports.
RUN_MARKERS = ("config.json", "checkpoint.pt", "best.pt", "metrics.jsonl", LOCK, STATUS)


class RunDirBusy(ValueError):
    """Another process is writing the run directory."""


class RunDirError(ValueError):
    """A path cannot be used as a run directory."""


def safe_stem(stem: str) -> str:
    """``stem`` as one path component: runs of characters other than letters, digits, ``.``, ``_``
    and ``-`` (path separators, blanks, ...) become one ``-``; ``run`` when nothing is left."""
    return re.sub(r"[^\w.-]+", "-", stem).strip(".-")[:80] or "run"


def create_unique_run_dir(parent: str | Path, stem: str) -> Path:
    """Create and return a new directory ``parent/STEM-YYYYmmdd-HHMMSS-XXXX`` (random hex suffix);
    an existing name is never reused.  ``stem`` is made one path component (:func:`safe_stem`), so a
    data name with a slash never names a folder that does not exist."""
    stem = safe_stem(stem)
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = parent / f"{stem}-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"could not create a new run directory under {parent}: every name tried exists")


def check_run_dir_usable(path: Path) -> None:
    """Refuse a path that is a file, a symbolic link to nothing, or a non-empty directory that
    holds no pyro-vae run."""
    if path.is_symlink() and not path.exists():
        raise RunDirError(f"run directory {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                          "create that folder or choose another --run-dir")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory; choose another --run-dir")
    if path.is_dir():
        entries = [p.name for p in path.iterdir()]
        if entries and not any(name in entries for name in RUN_MARKERS):
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunDirError(f"run directory {path} is not empty ({shown}) and holds no pyro-vae run; "
                              "choose a new or empty --run-dir")


class RunLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` until :meth:`release`
    (or until the process ends).  Re-entrant within a process for readers that write beside a
    holder (the pictures a finished training draws into its run), but never for training: a
    second trainer of a held run directory is refused even in the holder's own process."""

    _held: dict[str, list[Any]] = {}  # real path -> [fd, count, purposes of the holders]

    def __init__(self, run_dir: str | Path, purpose: str = "training") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.purpose = purpose
        self._key: str | None = None

    def acquire(self) -> "RunLock":
        if self._key is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        held = RunLock._held.get(key)
        if held is not None:
            if self.purpose == "training":
                holders = " and ".join(sorted(set(held[2])))
                raise RunDirBusy(f"run directory {self.run_dir} is in use by this process ({holders}); finish or "
                                 f"close that first, or use another --run-dir")
            held[1] += 1
            held[2].append(self.purpose)
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    elsewhere = "use another --run-dir" if self.purpose == "training" else \
                        "write into another folder with --out DIR"
                    raise RunDirBusy(f"run directory {self.run_dir} is in use by another pyro-vae process "
                                     f"({describe_holder(self.path)}); wait for it to finish, or {elsewhere}") from None
                raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        RunLock._held[key] = [fd, 1, [self.purpose]]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        held = RunLock._held[self._key]
        held[1] -= 1
        held[2].remove(self.purpose)
        if held[1] == 0:
            del RunLock._held[self._key]
            os.close(held[0])  # closing the descriptor releases the flock
        self._key = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(lock_path: Path) -> str:
    """``pid N on HOST, training since T`` from a lock file, or a plain phrase when unreadable."""
    try:
        info = json.loads(lock_path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, {info.get('purpose', 'writing')} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def is_locked(run_dir: str | Path) -> bool:
    """True when some process holds the run directory's lock (this one included)."""
    path = Path(run_dir) / LOCK
    if fcntl is None or not path.is_file():
        return False
    if os.path.realpath(path) in RunLock._held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return False


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files (``NAME.XXXX.tmp``, ``.NAME-XXXX.tmp.png``) that atomic writes of a
    killed process left behind."""
    removed = []
    run_dir = Path(run_dir)
    for path in [*run_dir.glob("*.tmp"), *run_dir.glob(".*.tmp.png")]:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, str]]:
    """A temporary file beside ``path`` (its descriptor and name) for the caller to fill; renamed
    onto ``path`` when the block ends, removed if it fails."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        yield fd, tmp
        replace_named(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the
    new content, never a torn file."""
    path = Path(path)
    with _replacing(path) as (fd, tmp):
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return path


def share_file(source: str | Path, path: str | Path) -> Path:
    """Make ``path`` a second name of the file ``source`` (a hard link, put in place by a rename),
    or a copy where the file system has no hard links.  ``source`` must only ever be replaced by a
    rename, never rewritten in place: ``path`` then keeps the content it was given."""
    source, path = Path(source), Path(path)
    with _replacing(path) as (fd, tmp):
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here: copy, and make the copy durable like the source
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(tmp, new_file_mode())
    return path


def replace_named(tmp: str | Path, path: str | Path) -> None:
    """``os.replace(tmp, path)``, whose failure names ``path`` (where the user wanted the file; a
    folder of that name, say) rather than the temporary file, which is gone once the caller cleans up."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        reason = "a directory of that name is in the way" if Path(path).is_dir() else e.strerror
        raise OSError(e.errno, f"cannot write it: {reason}", str(path)) from None


#: Entries of a metrics row the trainer writes and the readers use, all numbers.
METRIC_KEYS = ("epoch", "step", "train_loss", "valid_elbo", "valid_bound")


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a ``metrics.jsonl``, one per epoch in order (an epoch written twice keeps its
    last row), and the number of lines skipped: a line torn by a kill, or one that is not a row
    of numbers the trainer writes (an edit by hand, a disk error)."""
    rows: dict[int, dict[str, Any]] = {}
    skipped = 0
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            good = isinstance(row, dict) and all(
                isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool) for k in METRIC_KEYS)
            good = good and isinstance(row["epoch"], int) and row["epoch"] >= 1
        except ValueError:
            good = False
        if good:
            rows[row["epoch"]] = row
        else:
            skipped += 1
    return [rows[e] for e in sorted(rows)], skipped


def write_status(run_dir: str | Path, state: str, **fields: Any) -> None:
    """Record what the run's writer is doing (``training``, ``interrupted``, ``paused`` at its step
    limit, ``finished``, ``stopped_early``, ``diverged``) and where it is, in ``status.json``."""
    body = {"state": state, "pid": os.getpid(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    write_atomic(Path(run_dir) / STATUS, json.dumps(body, indent=2) + "\n")


def run_status(run_dir: str | Path) -> dict[str, Any] | None:
    """``status.json`` of a run, with ``state`` ``killed`` when it says ``training`` but nobody holds
    the lock (the writer died without saying so); None when there is none."""
    path = Path(run_dir) / STATUS
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    if status.get("state") == "training" and not is_locked(run_dir):
        status["state"] = "killed"
    return status
