"""Deterministic random train/valid/test splits for data sets without official ones."""

from __future__ import annotations

import numpy as np

from .errors import DataError


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` as a float if ``0 < value < 1``, else raise ``DataError``."""
    try:
        fraction = float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be a number in (0, 1), got {value!r}") from exc
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{name} must be in (0, 1), got {value!r}")
    return fraction


def split_indices(
    n: int, *, valid_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted, disjoint (train, valid, test) index arrays.

    ``round(n * test_fraction)`` examples go to test, then ``valid_fraction``
    of the rest to valid. The permutation depends only on ``seed`` (numpy's
    PCG64 stream is stable across numpy versions), so splits are reproducible.
    """
    n_test = round(n * test_fraction)
    n_valid = round((n - n_test) * valid_fraction)
    n_train = n - n_test - n_valid
    if n_train < 1 or n_valid < 1 or (test_fraction > 0 and n_test < 1):
        raise DataError(
            f"cannot split {n} examples into train/valid/test = {n_train}/{n_valid}/{n_test}: "
            f"every split needs at least one example (more data or other fractions needed)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    test = np.sort(perm[:n_test])
    valid = np.sort(perm[n_test : n_test + n_valid])
    train = np.sort(perm[n_test + n_valid :])
    return train, valid, test
