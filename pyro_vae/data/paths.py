"""Where data files live: the data-folder resolution rule."""

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
