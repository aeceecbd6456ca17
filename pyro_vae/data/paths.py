"""Where data files live (the data-folder resolution rule), and the permissions new files get."""

from __future__ import annotations

import os
import pathlib

#: Environment variable naming the data folder (CI sets it).
DATA_ENV_VAR = "PYRO_VAE_DATA"


def default_cache_dir() -> pathlib.Path:
    """The per-user cache folder for data: ``($XDG_CACHE_HOME or ~/.cache)/pyro-vae/data``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "pyro-vae" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the data folder to use, as an absolute path (it need not exist).

    Precedence: the explicit ``data_dir`` argument (e.g. from ``--data-dir``),
    then the ``PYRO_VAE_DATA`` environment variable, then the user cache folder
    ``($XDG_CACHE_HOME or ~/.cache)/pyro-vae/data``. Empty values count as unset.
    """
    if data_dir is not None and os.fspath(data_dir) != "":
        path = pathlib.Path(data_dir)
    elif os.environ.get(DATA_ENV_VAR, ""):
        path = pathlib.Path(os.environ[DATA_ENV_VAR])
    else:
        path = default_cache_dir()
    return path.expanduser().absolute()


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (``0o666`` less the umask).  Atomic writes go through
    ``tempfile.mkstemp``, whose files are private (``0o600``); they take this mode before the
    rename, so a run or a data file others may read is not left readable by its writer alone."""
    return 0o666 & ~_umask()
