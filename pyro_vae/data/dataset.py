"""The :class:`Dataset` container and the invariants every loaded data set satisfies."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DataError

SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(eq=False, repr=False)
class Dataset:
    """A data set as flattened float32 matrices, one per split.

    ``binary`` means every value of every split is exactly 0 or 1 (static
    binarization). ``dynamic_binarization`` (``mnist-binarized``) means the
    train split holds grayscale probabilities in [0, 1] and the trainer should
    draw ``x ~ Bernoulli(train)`` afresh each epoch (Burda et al., 2015), while
    valid and test were binarized once with a fixed seed so that evaluation is
    deterministic; ``binary`` is then False because train is not 0/1.

    Construction checks the invariants (2-D float32 splits with the same
    number of features, int64 labels of matching length, no NaN/inf, and 0/1
    values when ``binary`` is set) and raises :class:`DataError` otherwise.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    valid_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    image_shape: tuple[int, int] | None
    binary: bool
    dynamic_binarization: bool
    num_classes: int | None

    def __post_init__(self) -> None:
        num_features = None
        for split in SPLITS:
            x = getattr(self, split)
            where = f"data set {self.name!r}, split {split!r}"
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2:
                desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise DataError(f"{where}: expected a float32 tensor of shape (N, D), got {desc}")
            if x.shape[0] == 0:
                raise DataError(f"{where}: no examples")
            if x.shape[1] == 0:
                raise DataError(f"{where}: examples of 0 features; expected at least one value per example")
            if num_features is None:
                num_features = x.shape[1]
            elif x.shape[1] != num_features:
                raise DataError(f"{where}: {x.shape[1]} features, but train has {num_features}")
            _check_finite(x, where)
            if self.binary and not is_binary(x):
                raise DataError(f"{where}: binary=True but values other than 0 and 1 found")
            self._check_labels(split, x.shape[0], where)
        if self.image_shape is not None and math.prod(self.image_shape) != num_features:
            raise DataError(
                f"data set {self.name!r}: image_shape {self.image_shape} does not match {num_features} features"
            )

    def _check_labels(self, split: str, n: int, where: str) -> None:
        y = getattr(self, f"{split}_labels")
        if y is None:
            return
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (n,):
            desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise DataError(f"{where}: expected int64 labels of shape ({n},), got {desc}")
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"{where}: negative labels")
        if self.num_classes is not None and y.numel() and int(y.max()) >= self.num_classes:
            raise DataError(f"{where}: label {int(y.max())} >= num_classes={self.num_classes}")

    @property
    def num_features(self) -> int:
        """D, the number of (flattened) features per example."""
        return int(self.train.shape[1])

    def check_unit_interval(self) -> None:
        """Raise :class:`DataError` unless every value lies in [0, 1].

        Bernoulli decoders need pixel intensities (probabilities) in [0, 1];
        the message gives the min/max found per offending split.
        """
        problems = []
        for split in SPLITS:
            x = getattr(self, split)
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                problems.append(f"split {split!r} has min {lo:g}, max {hi:g}")
        if problems:
            raise DataError(
                f"data set {self.name!r} has values outside [0, 1] ({'; '.join(problems)}); "
                f"a Bernoulli decoder needs values in [0, 1]: rescale the data or use a "
                f"continuous (e.g. Gaussian) decoder"
            )

    def __repr__(self) -> str:
        sizes = "/".join(str(getattr(self, s).shape[0]) for s in SPLITS)
        return (
            f"Dataset(name={self.name!r}, train/valid/test={sizes}, num_features={self.num_features}, "
            f"image_shape={self.image_shape}, binary={self.binary}, "
            f"dynamic_binarization={self.dynamic_binarization}, num_classes={self.num_classes})"
        )


def is_binary(x: torch.Tensor) -> bool:
    """True if every value of ``x`` is exactly 0 or 1."""
    if x.device.type == "cpu":
        a = x.detach().numpy()  # numpy is ~2x faster than torch here
        return bool(((a == 0) | (a == 1)).all())
    return bool(((x == 0) | (x == 1)).all())


def count_non_finite(x: torch.Tensor) -> tuple[int, int]:
    """``(non-finite, NaN)`` value counts of ``x``, at the cost of one sum when there are none:
    NaN and inf propagate through a sum, so a finite sum proves every value finite; only a
    non-finite (or overflowed) sum is followed by an exact count."""
    if bool(torch.isfinite(x.sum())):
        return 0, 0
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return 0, 0
    return int((~finite).sum()), int(torch.isnan(x).sum())


def _check_finite(x: torch.Tensor, where: str) -> None:
    n_bad, n_nan = count_non_finite(x)
    if n_bad:
        raise DataError(
            f"{where}: {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} inf) "
            f"out of {x.numel()}; clean the data before training"
        )
