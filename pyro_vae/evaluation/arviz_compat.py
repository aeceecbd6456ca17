"""Every use of ArviZ in pyro-vae, behind feature detection.

ArviZ 0.x (Python 3.10/3.11 here: ``arviz`` 0.23) and ArviZ 1.x (newer
Pythons: ``arviz_base`` + ``arviz_stats``, ``DataTree`` instead of
``InferenceData``) have different APIs.  This module picks whichever is
installed and offers three things:

* :func:`psis_khat` -- Pareto-smoothed importance sampling k-hat per row of
  log-weights (Vehtari et al. 2024).  By default ArviZ 0.x ``psislw``'s
  k-hat computed for all rows at once in NumPy (:func:`vectorized_khat`: the
  same tail, the same Zhang & Stephens 2009 fit with ArviZ's prior; ArviZ
  loops over rows in Python, ~8 ms per row at K = 5000, which is 10 % of an
  evaluation of an MLP VAE on a CPU).  Forced by name: ArviZ 0.x
  ``arviz.psislw``; ArviZ 1.x ``arviz_stats.base.array_stats.psislw`` (on
  negated log-weights); a pure-torch fit with
  ``pyro.ops.stats.fit_generalized_pareto``.  :func:`khat_backend` names the
  default.
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
#: Rows per block of :func:`vectorized_khat` (bounds its ``(rows, m, tail)`` temporaries to ~10 MB).
KHAT_ROWS_PER_BLOCK = 128
#: The default k-hat backend: :func:`vectorized_khat`.
VECTORIZED_BACKEND = "numpy"


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
    """Which implementation :func:`psis_khat` uses by default: :func:`vectorized_khat`."""
    return "numpy, vectorized over points (the k-hat of ArviZ 0.x psislw, reff=1)"


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
    constant weights (an exact proposal) get ``-inf``.  ``backend`` is ``"numpy"``
    (the default, :func:`vectorized_khat`), ``"arviz"``, ``"arviz-stats"`` or ``"pyro"``.
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
    if backend not in (None, VECTORIZED_BACKEND, "arviz", "arviz-stats", "pyro"):
        raise ValueError(f"unknown k-hat backend {backend!r}; expected numpy, arviz, arviz-stats or pyro")
    if backend in (None, VECTORIZED_BACKEND):
        return vectorized_khat(lw)
    if backend == "arviz":
        az = _arviz_legacy()
        if az is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "k-hat > 0.7" warnings: we report these ourselves
                return np.asarray(az.psislw(lw, reff=1.0)[1], dtype=np.float64)
        raise ArviZUnavailable("ArviZ 0.x (arviz.psislw) is not installed")
    if backend == "arviz-stats":
        stats = _arviz_stats_array()
        if stats is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # arviz-stats' psislw takes *negated* log-ratios (log-likelihoods, as in PSIS-LOO)
                # and smooths exp(-ary); its pareto_khat(log_weights=True) fits the log-weights
                # themselves, not the weights, so it is not the PSIS k-hat.
                _, k = stats.psislw(-lw, r_eff=1.0, axis=-1)
            return np.asarray(k, dtype=np.float64).reshape(lw.shape[0])
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


# -- PSIS k-hat for many rows at once ------------------------------------------------------

def vectorized_khat(log_weights: np.ndarray) -> np.ndarray:
    """PSIS k-hat of each row of ``(B, K)`` float64 log-weights, as ArviZ 0.x ``psislw(lw, reff=1)``
    computes it, for all rows at once.

    Per row (Vehtari et al. 2024): the ``M = ceil(min(K / 5, 3 sqrt(K)))`` largest
    weights above the next one (the cut-off, at least the smallest positive
    float), shifted to excesses ``w - w_cut`` and fitted with the empirical-Bayes
    generalized Pareto estimate of Zhang & Stephens (2009) with ArviZ's weakly
    informative prior on ``k`` (:func:`_gpdfit_rows`); fewer than five tail
    weights give ``inf``.  A row whose tail is not exactly the ``M`` largest
    weights (ties at the cut-off, the cut-off clamped, non-finite values) is
    done on its own by :func:`_khat_row`.  Agrees with ArviZ to rounding.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    rows, n = lw.shape
    tail_len = int(np.ceil(min(n / 5.0, 3 * n**0.5)))
    out = np.empty(rows)
    if tail_len + 1 > n:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return np.array([_khat_row(row) for row in lw])
    cutoff_min = np.log(np.finfo(float).tiny)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # as under ArviZ: inf/nan stay
        for start in range(0, rows, KHAT_ROWS_PER_BLOCK):
            out[start:start + KHAT_ROWS_PER_BLOCK] = _khat_block(lw[start:start + KHAT_ROWS_PER_BLOCK],
                                                                  tail_len, cutoff_min)
    return out


def _khat_block(block: np.ndarray, tail_len: int, cutoff_min: float) -> np.ndarray:
    n = block.shape[1]
    x = block - block.max(axis=1, keepdims=True)
    top = np.sort(np.partition(x, n - tail_len - 1, axis=1)[:, n - tail_len - 1:], axis=1)
    cutoff = np.maximum(top[:, 0], cutoff_min)
    regular = np.isfinite(top).all(axis=1) & (top[:, 1] > cutoff) & (tail_len > 4)
    result = np.empty(block.shape[0])
    if regular.any():
        excess = np.exp(top[regular, 1:]) - np.exp(cutoff[regular])[:, None]
        result[regular] = _gpdfit_rows(excess)
    for i in np.flatnonzero(~regular):
        result[i] = _khat_row(block[i])
    return result


def _khat_row(log_weights: np.ndarray) -> float:
    """k-hat of one row, step by step as ArviZ 0.x ``_psislw`` (the k only)."""
    x = np.array(log_weights, dtype=np.float64)
    n = x.shape[0]
    x -= np.max(x)
    cutoff_index = -int(np.ceil(min(n / 5.0, 3 * n**0.5))) - 1
    cutoff = max(np.sort(x)[cutoff_index], np.log(np.finfo(float).tiny))
    tail = np.sort(x[x > cutoff])
    if tail.shape[0] <= 4:
        return math.inf
    return float(_gpdfit_rows((np.exp(tail) - np.exp(cutoff))[None])[0])


def _gpdfit_rows(excess: np.ndarray) -> np.ndarray:
    """Shape ``k`` of a generalized Pareto fit to each row of ascending ``(R, n)`` excesses:
    Zhang & Stephens (2009)'s posterior-mean estimate over a grid of ``m = 30 + sqrt(n)``
    values of ``b = -k / sigma``, then ArviZ's prior (``k`` shrunk towards 0.5 with
    the weight of 10 observations).  ArviZ 0.x ``_gpdfit``, term by term, per row."""
    prior_bs, prior_k = 3, 10
    rows, n = excess.shape
    m = 30 + int(n**0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b = b[None, :] / (prior_bs * excess[:, int(n / 4 + 0.5) - 1])[:, None]
    b = b + (1 / excess[:, -1])[:, None]
    k = np.log1p(-b[:, :, None] * excess[:, None, :]).mean(axis=2)
    length_scale = n * (np.log(-(b / k)) - k - 1)
    weights = 1 / np.exp(length_scale[:, None, :] - length_scale[:, :, None]).sum(axis=2)
    keep = weights >= 10 * np.finfo(float).eps  # negligible (or nan) weights are dropped, b with them
    weights = np.where(keep, weights, 0.0)
    weights = weights / weights.sum(axis=1, keepdims=True)
    b_post = np.where(keep, b * weights, 0.0).sum(axis=1)
    k_post = np.log1p(-b_post[:, None] * excess).mean(axis=1)
    return (n * k_post + prior_k * 0.5) / (n + prior_k)


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
