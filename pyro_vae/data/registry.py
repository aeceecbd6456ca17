"""Data sets by name: :func:`load_dataset` and the loader behind each name."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import numpy as np
import torch

from . import sources
from .dataset import SPLITS, Dataset, is_binary
from .download import ensure_files, read_verified
from .errors import DataError
from .formats import parse_amat, parse_idx, read_array_file
from .paths import resolve_data_dir
from .splits import check_fraction, split_indices

#: Built-in data set names; a path to a ``.npy``/``.npz`` file is accepted too.
DATASET_NAMES: tuple[str, ...] = ("digits", "binarized-mnist", "mnist", "mnist-binarized")

#: Fraction of all examples used as test set when a data set has no official split.
TEST_FRACTION = 0.15
#: MNIST: the last this-many training images form the validation split.
MNIST_VALID_SIZE = 10_000
#: Seed of the one-off binarization of mnist-binarized's valid and test splits.
EVAL_BINARIZATION_SEED = 0

_ARRAY_SUFFIXES = (".npy", ".npz")


def load_dataset(
    name: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    valid_fraction: float = 0.1,
    split_seed: int = 0,
) -> Dataset:
    """Load a data set by name (see ``DATASET_NAMES``) or from a ``.npy``/``.npz`` path.

    Files are looked up in ``<data_dir>/<name>/`` then ``<data_dir>/`` (see
    :func:`resolve_data_dir`), downloaded if missing and ``download`` is true,
    and md5-verified. ``valid_fraction`` (of the non-test examples) and
    ``split_seed`` only matter for data without an official validation split
    (``digits``, ``.npy``, some ``.npz``); there the split is a deterministic
    function of ``split_seed``. Raises :class:`DataError` (or a subclass) on
    any problem, with a message that says how to fix it.
    """
    fraction = check_fraction("valid_fraction", valid_fraction)
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise DataError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    text = os.fspath(name)
    key = text.strip().lower().replace("_", "-")
    if key in _BUILTIN:
        root = resolve_data_dir(data_dir)
        if root.exists() and not root.is_dir():
            raise DataError(f"the data folder {root} is a file; choose a folder with --data-dir DIR or the "
                            "PYRO_VAE_DATA environment variable")
        return _BUILTIN[key](root, download, fraction, int(split_seed))
    if pathlib.Path(text).suffix.lower() in _ARRAY_SUFFIXES:
        path = _find_array_file(text, data_dir)
        return _load_array_file(path, text, fraction, int(split_seed))
    raise DataError(
        f"unknown data set {text!r}; valid names: {', '.join(DATASET_NAMES)}, "
        f"or a path to a .npy or .npz file"
    )


# --------------------------------------------------------------------------- helpers


#: The largest float32: values beyond it become infinite when data are converted.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _features(x: np.ndarray, where: str = "data") -> torch.Tensor:
    """(N, ...) array -> contiguous, writable float32 tensor (N, D); finite values too large for
    float32 are refused by name rather than turned into infinities."""
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and x.size:
        finite = x[np.isfinite(x)]
        peak = float(np.abs(finite).max()) if finite.size else 0.0
        if peak > FLOAT32_MAX:
            raise DataError(f"{where}: values reach |x| = {peak:g}, beyond float32's largest {FLOAT32_MAX:.3g}, "
                            "which pyro-vae computes in; rescale the data")
    flat = np.array(x.reshape(x.shape[0], -1), dtype=np.float32, copy=True)
    return torch.from_numpy(flat)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64, copy=True))


def _num_classes(*labels: torch.Tensor | None) -> int | None:
    present = [y for y in labels if y is not None and y.numel()]
    return max(int(y.max()) for y in present) + 1 if present else None


# --------------------------------------------------------------------------- digits


def _load_digits(data_dir: pathlib.Path, download: bool, valid_fraction: float, seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16 scaled to [0, 1]); no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    train, valid, test = split_indices(len(x), valid_fraction=valid_fraction, test_fraction=TEST_FRACTION, seed=seed)
    return Dataset(
        name="digits",
        train=_features(x[train]),
        valid=_features(x[valid]),
        test=_features(x[test]),
        train_labels=_labels(y[train]),
        valid_labels=_labels(y[valid]),
        test_labels=_labels(y[test]),
        image_shape=(8, 8),
        binary=False,
        dynamic_binarization=False,
        num_classes=10,
    )


# --------------------------------------------------------------------------- binarized MNIST


def _load_binarized_mnist(data_dir: pathlib.Path, download: bool, valid_fraction: float, seed: int) -> Dataset:
    """Static binarized MNIST (Larochelle & Murray 2011), official 50k/10k/10k splits, no labels."""
    files = [sources.BINARIZED_MNIST_FILES[split] for split in SPLITS]
    paths = ensure_files("binarized-mnist", files, data_dir, "binarized-mnist", download=download)
    x = {
        split: torch.from_numpy(parse_amat(read_verified(path, remote), 784, str(path))).to(torch.float32)
        for split, path, remote in zip(SPLITS, paths, files)
    }
    return Dataset(
        name="binarized-mnist",
        train=x["train"],
        valid=x["valid"],
        test=x["test"],
        train_labels=None,
        valid_labels=None,
        test_labels=None,
        image_shape=(28, 28),
        binary=True,
        dynamic_binarization=False,
        num_classes=None,
    )


# --------------------------------------------------------------------------- MNIST


def _read_mnist(data_dir: pathlib.Path, download: bool, dataset: str) -> dict[str, np.ndarray]:
    """The four MNIST IDX files as arrays, header-checked (images 2051, labels 2049)."""
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    files = [sources.MNIST_FILES[k] for k in keys]
    paths = ensure_files(dataset, files, data_dir, "mnist", download=download)
    arrays: dict[str, np.ndarray] = {}
    for key, path, remote in zip(keys, paths, files):
        array = parse_idx(read_verified(path, remote), str(path))
        ndim, magic = (3, 2051) if key.endswith("images") else (1, 2049)
        if array.dtype != np.uint8 or array.ndim != ndim:
            raise DataError(
                f"{path}: expected an IDX file with magic number {magic} (uint8, {ndim} dims), "
                f"got {array.dtype} with shape {array.shape}; is it the right file?"
            )
        arrays[key] = array
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise DataError(f"MNIST {part}: {n_img} images but {n_lab} labels")
    if len(arrays["train_images"]) <= MNIST_VALID_SIZE:
        raise DataError(f"MNIST train has {len(arrays['train_images'])} images, need more than {MNIST_VALID_SIZE}")
    return arrays


def _mnist_splits(arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Grayscale /255 float32 (N, 784) splits and int64 labels; valid = last 10,000 train images."""
    images, labels = arrays["train_images"], arrays["train_labels"]
    cut = len(images) - MNIST_VALID_SIZE
    parts = {
        "train": (images[:cut], labels[:cut]),
        "valid": (images[cut:], labels[cut:]),
        "test": (arrays["test_images"], arrays["test_labels"]),
    }
    x = {s: torch.from_numpy(img.reshape(len(img), -1).astype(np.float32) / np.float32(255.0)) for s, (img, _) in parts.items()}
    y = {s: _labels(lab) for s, (_, lab) in parts.items()}
    return x, y


def _load_mnist(data_dir: pathlib.Path, download: bool, valid_fraction: float, seed: int) -> Dataset:
    """MNIST grayscale in [0, 1] (for continuous decoders), 50k/10k/10k, labels kept."""
    x, y = _mnist_splits(_read_mnist(data_dir, download, "mnist"))
    return _mnist_dataset("mnist", x, y, dynamic_binarization=False)


def _mnist_dataset(name: str, x: dict, y: dict, dynamic_binarization: bool) -> Dataset:
    return Dataset(
        name=name,
        train=x["train"], valid=x["valid"], test=x["test"],
        train_labels=y["train"], valid_labels=y["valid"], test_labels=y["test"],
        image_shape=(28, 28),
        binary=False,
        dynamic_binarization=dynamic_binarization,
        num_classes=10,
    )


def _load_mnist_binarized(data_dir: pathlib.Path, download: bool, valid_fraction: float, seed: int) -> Dataset:
    """Dynamically binarized MNIST (Burda et al. 2015).

    Train stays grayscale and the trainer resamples ``x ~ Bernoulli(train)``
    each epoch; valid and test are binarized here once, with the fixed seed
    ``EVAL_BINARIZATION_SEED``, so evaluation is the same in every run.
    """
    x, y = _mnist_splits(_read_mnist(data_dir, download, "mnist-binarized"))
    rng = np.random.default_rng(EVAL_BINARIZATION_SEED)
    for split in ("valid", "test"):
        probs = x[split].numpy()
        x[split] = torch.from_numpy((rng.random(probs.shape, dtype=np.float32) < probs).astype(np.float32))
    return _mnist_dataset("mnist-binarized", x, y, dynamic_binarization=True)


_BUILTIN: dict[str, Callable[[pathlib.Path, bool, float, int], Dataset]] = {
    "digits": _load_digits,
    "binarized-mnist": _load_binarized_mnist,
    "mnist": _load_mnist,
    "mnist-binarized": _load_mnist_binarized,
}


# --------------------------------------------------------------------------- .npy / .npz

_NPZ_LAYOUTS = (
    # (required keys, optional keys)
    (("train", "valid", "test"), ("train_labels", "valid_labels", "test_labels")),
    (("train", "test"), ("train_labels", "test_labels")),
    (("x",), ("y",)),
)


def _find_array_file(text: str, data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    """The path as given (relative to the working directory), else relative to the data folder."""
    path = pathlib.Path(text).expanduser()
    candidates = [path]
    if not path.is_absolute():
        candidates.append(resolve_data_dir(data_dir) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"data file not found: {text!r} (looked at {', '.join(str(c.absolute()) for c in candidates)})")


def _npz_layout(path: pathlib.Path, keys: set[str]) -> tuple[str, ...]:
    for required, optional in _NPZ_LAYOUTS:
        if set(required) <= keys <= set(required) | set(optional):
            return required
    raise DataError(
        f"{path}: unrecognised arrays {sorted(keys)}; expected keys 'train', 'valid', 'test' "
        f"(each optionally with '<split>_labels'), or 'train' and 'test' (+ labels; validation "
        f"is then split off train), or 'x' (optionally with labels 'y'), which is split like a .npy file"
    )


def _check_array(array: np.ndarray, where: str, *, labels_for: int | None = None) -> np.ndarray:
    if labels_for is None:
        if array.dtype.kind not in "biuf":
            raise DataError(f"{where}: expected numbers, got dtype {array.dtype}")
        if array.ndim == 0 or array.shape[0] == 0:
            raise DataError(f"{where}: expected an array of shape (N, ...) with N >= 1, got shape {array.shape}")
        if array.ndim == 1:
            array = array[:, None]
        return array
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.shape != (labels_for,):
        raise DataError(f"{where}: expected {labels_for} labels of shape ({labels_for},), got shape {array.shape}")
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        array = array.astype(np.int64)
    if array.dtype.kind not in "biu":
        raise DataError(f"{where}: labels must be integers, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise DataError(f"{where}: labels must be >= 0")
    if array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{where}: label {int(array.max())} does not fit in int64; relabel the classes 0..K-1")
    return array.astype(np.int64)


def _load_array_file(path: pathlib.Path, name: str, valid_fraction: float, seed: int) -> Dataset:
    """A user's ``.npy`` (one (N, ...) array) or ``.npz`` (see ``_NPZ_LAYOUTS``) data set."""
    arrays = read_array_file(path)
    features: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray | None] = {}
    if "" in arrays:  # .npy
        layout: tuple[str, ...] = ("x",)
        arrays = {"x": arrays[""]}
    else:
        layout = _npz_layout(path, set(arrays))
        with_labels = [f"{split}_labels" for split in layout if f"{split}_labels" in arrays]
        if with_labels and len(with_labels) != len(layout):
            raise DataError(
                f"{path}: labels for some splits only ({', '.join(with_labels)}); give "
                f"{', '.join(repr(f'{split}_labels') for split in layout)} for all splits or none"
            )
    if layout == ("x",):
        x = _check_array(arrays["x"], f"{path} ['x']")
        y = arrays.get("y")
        if y is not None:
            y = _check_array(y, f"{path} ['y']", labels_for=len(x))
        idx = split_indices(len(x), valid_fraction=valid_fraction, test_fraction=TEST_FRACTION, seed=seed)
        for split, i in zip(SPLITS, idx):
            features[split] = x[i]
            labels[split] = None if y is None else y[i]
        source_shape = x.shape
    else:
        for split in layout:
            features[split] = _check_array(arrays[split], f"{path} [{split!r}]")
            y = arrays.get(f"{split}_labels")
            labels[split] = None if y is None else _check_array(y, f"{path} [{split + '_labels'!r}]", labels_for=len(features[split]))
        if "valid" not in layout:
            train, valid, _ = split_indices(len(features["train"]), valid_fraction=valid_fraction, test_fraction=0.0, seed=seed)
            x, y = features["train"], labels["train"]
            features["train"], features["valid"] = x[train], x[valid]
            labels["train"], labels["valid"] = (None, None) if y is None else (y[train], y[valid])
        source_shape = features["train"].shape
        for split in SPLITS:
            if features[split].shape[1:] != source_shape[1:]:
                raise DataError(
                    f"{path}: split {split!r} has examples of shape {features[split].shape[1:]}, "
                    f"train has {source_shape[1:]}"
                )
    xs = {split: _features(features[split], f"{path} (split {split!r})") for split in SPLITS}
    ys = {split: None if labels[split] is None else _labels(labels[split]) for split in SPLITS}
    image_shape = (int(source_shape[1]), int(source_shape[2])) if len(source_shape) == 3 else None
    return Dataset(
        name=name,
        train=xs["train"],
        valid=xs["valid"],
        test=xs["test"],
        train_labels=ys["train"],
        valid_labels=ys["valid"],
        test_labels=ys["test"],
        image_shape=image_shape,
        binary=all(is_binary(x) for x in xs.values()),
        dynamic_binarization=False,
        num_classes=_num_classes(*ys.values()),
    )
