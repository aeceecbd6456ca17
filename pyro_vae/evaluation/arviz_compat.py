"""Every use of ArviZ in pyro-vae, behind feature detection.

ArviZ 0.x (Python 3.10/3.11 here: ``arviz`` 0.23) and ArviZ 1.x (newer
Pythons: ``arviz_base`` + ``arviz_stats``, ``DataTree`` instead of
``InferenceData``) have different APIs.  This module picks whichever is
installed and offers three things:

* :func:`psis_khat` -- Pareto-smoothed importance sampling k-hat per row of
  log-weights (Vehtari et al. 2024).  ArviZ 0.x ``arviz.psislw``; ArviZ 1.x
  ``arviz_stats.base.array_stats.psislw`` (on negated log-weights); with
  neither, a pure-torch fit of the same generalized Pareto tail with
  ``pyro.ops.stats.fit_generalized_pareto`` (Zhang & Stephens 2009, as in
  PSIS).  :func:`khat_backend` names the one in use.
* :func:`to_inference_data` / :func:`save_netcdf` / :func:`load_netcdf` --
  ArviZ's container for posterior draws, written as netCDF (needs ``netCDF4``
  or ``h5netcdf``).  Without ArviZ these raise :class:`ArviZUnavailable`.

Nothing here is imported at ``import pyro_vae`` time, and importing this module
never fails: ArviZ is looked up lazily.
"""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A row whose log-weights spread less than this (in nats) has constant weights:
# the proposal is exact, importance sampling has zero variance, and k-hat is -inf.
CONSTANT_WEIGHTS_TOLERANCE = 1e-9


class ArviZUnavailable(ValueError):
    """ArviZ (or a netCDF engine) is needed for this feature but is not installed."""


def _import(name: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ArviZ 0.23 announces its 1.0 refactor on import
            return importlib.import_module(name)
    except ImportError:
        return None


def _arviz_legacy():
    """``arviz`` 0.x (has ``InferenceData`` and ``psislw``), or None."""
    az = _import("arviz")
    # ArviZ 1.x re-exports arviz_stats (whose psislw negates its input) under ``arviz``: check the version.
    if az is not None and str(getattr(az, "__version__", "")).startswith("0.") \
            and hasattr(az, "InferenceData") and hasattr(az, "psislw"):
        return az
    return None


def _arviz_stats_array():
    stats = _import("arviz_stats.base")
    return getattr(stats, "array_stats", None) if stats is not None else None


def khat_backend() -> str:
    """Which implementation :func:`psis_khat` uses: ``arviz <version>``,
    ``arviz-stats <version>``, or ``pyro.ops.stats.fit_generalized_pareto``."""
    az = _arviz_legacy()
    if az is not None:
        return f"arviz {az.__version__} psislw"
    if _arviz_stats_array() is not None:
        return f"arviz-stats {_version('arviz_stats')} psislw"
    return "pyro.ops.stats.fit_generalized_pareto (ArviZ not installed)"


def arviz_version() -> str | None:
    """The installed ArviZ version (0.x ``arviz`` or 1.x ``arviz_base``), or None."""
    for name in ("arviz", "arviz_base"):
        version = _version(name)
        if version:
            return version
    return None


def _version(module: str) -> str | None:
    mod = _import(module)
    return getattr(mod, "__version__", None) if mod is not None else None


def psis_khat(log_weights: torch.Tensor | np.ndarray, backend: str | None = None) -> np.ndarray:
    """Pareto k-hat of the importance weights, one per row of ``(B, K)`` log-weights.

    Independent draws, so the relative efficiency ``r_eff`` is 1.  Rows of
    constant weights (an exact proposal) get ``-inf``.  ``backend`` forces
    ``"arviz"``, ``"arviz-stats"`` or ``"pyro"`` (default: the first available).
    """
    lw = log_weights.detach().cpu().double().numpy() if isinstance(log_weights, torch.Tensor) \
        else np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 2:
        raise ValueError(f"expected log-weights of shape (points, particles), got shape {lw.shape}")
    if lw.shape[1] < 5:
        raise ValueError(f"PSIS needs more particles per point than {lw.shape[1]} (use at least 100)")
    khat = np.empty(lw.shape[0])
    constant = (lw.max(1) - lw.min(1)) < CONSTANT_WEIGHTS_TOLERANCE
    khat[constant] = -np.inf
    rows = lw[~constant]
    if rows.shape[0]:
        khat[~constant] = _khat_rows(rows, backend)
    return khat


def _khat_rows(lw: np.ndarray, backend: str | None) -> np.ndarray:
    if backend not in (None, "arviz", "arviz-stats", "pyro"):
        raise ValueError(f"unknown k-hat backend {backend!r}; expected arviz, arviz-stats or pyro")
    if backend in (None, "arviz"):
        az = _arviz_legacy()
        if az is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "k-hat > 0.7" warnings: we report these ourselves
                return np.asarray(az.psislw(lw, reff=1.0)[1], dtype=np.float64)
        if backend == "arviz":
            raise ArviZUnavailable("ArviZ 0.x (arviz.psislw) is not installed")
    if backend in (None, "arviz-stats"):
        stats = _arviz_stats_array()
        if stats is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # arviz-stats' psislw takes *negated* log-ratios (log-likelihoods, as in PSIS-LOO)
                # and smooths exp(-ary); its pareto_khat(log_weights=True) fits the log-weights
                # themselves, not the weights, so it is not the PSIS k-hat.
                _, k = stats.psislw(-lw, r_eff=1.0, axis=-1)
            return np.asarray(k, dtype=np.float64).reshape(lw.shape[0])
        if backend == "arviz-stats":
            raise ArviZUnavailable("arviz-stats (ArviZ 1.x) is not installed")
    return np.array([_pyro_khat(row) for row in lw])


def _pyro_khat(log_weights: np.ndarray) -> float:
    """k-hat of one row: fit a generalized Pareto distribution to the largest
    ``M = ceil(min(K / 5, 3 sqrt(K)))`` weights above the cut-off, as PSIS does."""
    from pyro.ops.stats import fit_generalized_pareto

    k = log_weights.shape[0]
    tail = int(math.ceil(min(0.2 * k, 3.0 * math.sqrt(k))))
    lw = np.sort(log_weights - log_weights.max())
    cutoff = lw[-tail - 1]
    excess = np.exp(lw[-tail:]) - math.exp(cutoff)
    if tail < 5 or not np.any(excess > 0):
        return math.inf
    khat, _ = fit_generalized_pareto(torch.from_numpy(excess))
    return float(khat)


# -- InferenceData ---------------------------------------------------------------------

def to_inference_data(posterior: dict[str, np.ndarray], sample_stats: dict[str, np.ndarray] | None = None,
                      constant_data: dict[str, np.ndarray] | None = None, coords: dict[str, Any] | None = None,
                      dims: dict[str, list[str]] | None = None, attrs: dict[str, Any] | None = None) -> Any:
    """ArviZ's container of draws: ``InferenceData`` (ArviZ 0.x) or ``DataTree`` (1.x).

    Arrays in ``posterior`` and ``sample_stats`` have leading ``(chain, draw)``
    dimensions; ``dims`` names the rest.
    """
    az = _arviz_legacy()
    if az is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shape validation complains about a single chain
            return az.from_dict(posterior=posterior, sample_stats=sample_stats, constant_data=constant_data,
                                coords=coords, dims=dims, attrs=attrs)
    base = _import("arviz_base")
    if base is not None and hasattr(base, "from_dict"):
        groups = {"posterior": posterior}
        if sample_stats:
            groups["sample_stats"] = sample_stats
        if constant_data:
            groups["constant_data"] = constant_data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return base.from_dict(groups, coords=coords, dims=dims, attrs={"/": attrs} if attrs else None)
    raise ArviZUnavailable("exporting posterior samples needs ArviZ: pip install arviz")


def save_netcdf(data: Any, path: str | Path) -> Path:
    """Write an ``InferenceData``/``DataTree`` to ``path`` (netCDF)."""
    path = Path(path)
    if _import("netCDF4") is None and _import("h5netcdf") is None:
        raise ArviZUnavailable("writing netCDF needs the netCDF4 or h5netcdf package: pip install netCDF4")
    data.to_netcdf(str(path))
    return path


def load_netcdf(path: str | Path) -> Any:
    """Read back what :func:`save_netcdf` wrote (``arviz.from_netcdf`` or ``xarray.open_datatree``)."""
    az = _arviz_legacy()
    if az is not None:
        return az.from_netcdf(str(path))
    xr = _import("xarray")
    if xr is not None and hasattr(xr, "open_datatree"):
        return xr.open_datatree(str(path))
    raise ArviZUnavailable("reading InferenceData needs ArviZ: pip install arviz")
