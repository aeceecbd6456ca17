"""Tests for pyro_vae.data: data sets by name, parsers, download and md5 verification.

No test touches the network: an autouse fixture replaces ``urllib.request.urlopen``
with one that fails, and download tests serve bytes from memory. The real-data
tests run when PYRO_VAE_DATA is set (CI sets it) and fail if files are missing.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import re
import stat
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from pyro_vae.data import (
    DATA_ENV_VAR,
    DATASET_NAMES,
    ChecksumError,
    DataError,
    Dataset,
    MissingDataError,
    download,
    load_dataset,
    registry,
    resolve_data_dir,
    sources,
)
from pyro_vae.data.formats import parse_amat, parse_idx, read_amat, read_idx

# --------------------------------------------------------------------------- helpers


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def amat_text(rows: np.ndarray, *, crlf: bool = False, trailing_space: bool = False) -> bytes:
    end = (" " if trailing_space else "") + ("\r\n" if crlf else "\n")
    return "".join(" ".join(str(int(v)) for v in row) + end for row in rows).encode()


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


class FakeResponse(io.BytesIO):
    """What ``urlopen`` returns, served from memory."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def serve(monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes]) -> list[str]:
    """Make urlopen serve ``payloads`` (URL -> bytes); other URLs fail. Returns the URLs requested."""
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float | None = None) -> FakeResponse:
        requested.append(url)
        if url in payloads:
            return FakeResponse(payloads[url])
        raise urllib.error.URLError(f"no such test URL {url}")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network; the checksum cache starts empty."""

    def refuse(url: str, timeout: float | None = None) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    download.clear_checksum_cache()


RNG = np.random.default_rng(1234)
# Tiny fake MNIST: 28x28 images, 12 train (2 of them valid), 5 test.
FAKE_MNIST = {
    "train_images": RNG.integers(0, 256, size=(12, 28, 28), dtype=np.uint8),
    "train_labels": RNG.integers(0, 10, size=12).astype(np.uint8),
    "test_images": RNG.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
    "test_labels": RNG.integers(0, 10, size=5).astype(np.uint8),
}


@pytest.fixture
def fake_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The fake MNIST .gz payloads by URL, with the md5 table and valid size patched to match."""
    monkeypatch.setattr(registry, "MNIST_VALID_SIZE", 2)
    payloads: dict[str, bytes] = {}
    for key, array in FAKE_MNIST.items():
        raw = idx_bytes(array)
        gz = gzip.compress(raw, mtime=0)
        remote = dataclasses.replace(sources.MNIST_FILES[key], gzip_md5=md5(gz), content_md5=md5(raw))
        monkeypatch.setitem(sources.MNIST_FILES, key, remote)
        payloads[remote.urls[0]] = gz
    return payloads


# --------------------------------------------------------------------------- digits


def test_digits_shapes_values_labels() -> None:
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset) and ds.name == "digits"
    n = [len(ds.train), len(ds.valid), len(ds.test)]
    assert sum(n) == 1797
    assert n[2] == round(0.15 * 1797)  # test = 15 %
    assert n[1] == round((1797 - n[2]) * 0.1)  # valid = valid_fraction of the rest
    for x, y in [(ds.train, ds.train_labels), (ds.valid, ds.valid_labels), (ds.test, ds.test_labels)]:
        assert x.dtype == torch.float32 and x.shape[1] == 64
        assert y is not None and y.dtype == torch.int64 and y.shape == (len(x),)
    assert ds.num_features == 64 and ds.image_shape == (8, 8) and ds.num_classes == 10
    assert float(ds.train.min()) == 0.0 and float(ds.train.max()) == 1.0  # 0..16 scaled by 1/16
    assert not ds.binary and not ds.dynamic_binarization
    ds.check_unit_interval()
    assert set(ds.train_labels.tolist()) == set(range(10))


def test_digits_splits_deterministic_seeded_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits"), load_dataset("digits", split_seed=0)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(a, split), getattr(b, split))
    c = load_dataset("digits", split_seed=1)
    assert not torch.equal(a.test, c.test)
    # The three splits partition the 1797 examples: as a multiset of (image, label)
    # they equal the original data, so no example is in two splits or missing.
    bunch = load_digits()
    original = collections.Counter(
        (tuple(row), int(label)) for row, label in zip((bunch.data / 16).astype(np.float32).tolist(), bunch.target)
    )
    splits = collections.Counter()
    for x, y in [(a.train, a.train_labels), (a.valid, a.valid_labels), (a.test, a.test_labels)]:
        splits.update((tuple(row), int(label)) for row, label in zip(x.tolist(), y.tolist()))
    assert splits == original


def test_valid_fraction_and_seed_validated() -> None:
    bigger = load_dataset("digits", valid_fraction=0.5)
    assert len(bigger.valid) == round((1797 - 270) * 0.5)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="valid_fraction"):
            load_dataset("digits", valid_fraction=bad)
    with pytest.raises(DataError, match="split_seed"):
        load_dataset("digits", split_seed=-1)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar-100")
    message = str(info.value)
    assert "cifar-100" in message
    for name in DATASET_NAMES:
        assert name in message
    assert ".npy" in message


def test_dataset_names() -> None:
    assert DATASET_NAMES == ("digits", "binarized-mnist", "mnist", "mnist-binarized")


# --------------------------------------------------------------------------- amat


@pytest.mark.parametrize("compress", [False, True])
def test_amat_parser_canonical(tmp_path: pathlib.Path, compress: bool) -> None:
    rows = RNG.integers(0, 2, size=(7, 784))
    text = amat_text(rows)
    path = tmp_path / ("x.amat.gz" if compress else "x.amat")
    path.write_bytes(gzip.compress(text) if compress else text)
    parsed = read_amat(path)
    assert parsed.dtype == np.uint8 and parsed.shape == (7, 784)
    np.testing.assert_array_equal(parsed, rows)


def test_amat_parser_tolerates_crlf_trailing_blanks_and_blank_lines() -> None:
    rows = RNG.integers(0, 2, size=(3, 5))
    text = amat_text(rows, crlf=True, trailing_space=True) + b"\n"
    np.testing.assert_array_equal(parse_amat(text, width=5), rows)


@pytest.mark.parametrize(
    "text, pattern",
    [
        (b"0 1 0\n1 1\n", "line 2 has 2 values, expected 3"),
        (b"0 1 0\n1 0.5 1\n", r"line 2: unexpected character b'\.'"),
        (b"0 1 0\n1 10 1\n", "line 2"),
        (b"\n\n", "no data rows"),
    ],
)
def test_amat_parser_rejects_malformed(text: bytes, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        parse_amat(text, width=3, source="bad.amat")


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_idx_parser_images_and_labels(tmp_path: pathlib.Path, compress: bool) -> None:
    images = RNG.integers(0, 256, size=(4, 3, 2), dtype=np.uint8)
    labels = np.array([7, 0, 9, 3], dtype=np.uint8)
    for name, array in [("img", images), ("lab", labels)]:
        data = idx_bytes(array)
        (tmp_path / name).write_bytes(gzip.compress(data) if compress else data)
    parsed = read_idx(tmp_path / "img")
    assert parsed.dtype == np.uint8 and parsed.shape == (4, 3, 2)
    np.testing.assert_array_equal(parsed, images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)
    assert int.from_bytes(idx_bytes(images)[:4], "big") == 2051  # the MNIST image magic


def test_idx_parser_big_endian_types() -> None:
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    parsed = parse_idx(idx_bytes(ints, 0x0C))
    assert parsed.dtype == np.int32 and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, ints)
    floats = np.array([0.5, -1.25], dtype=np.float32)
    np.testing.assert_array_equal(parse_idx(idx_bytes(floats, 0x0D)), floats)


@pytest.mark.parametrize(
    "data, pattern",
    [
        (b"\x00\x01\x08\x03" + bytes(12), "bad IDX magic number 0x00010803"),  # nonzero first bytes
        (b"\x00\x00\x07\x01" + bytes(4), "bad IDX magic number 0x00000701"),  # unknown type code
        (b"\x00\x00\x08\x00", "bad IDX magic number"),  # zero dimensions
        (b"\x00\x00", "too short"),
        (idx_bytes(np.zeros((2, 3), np.uint8))[:-1], "truncated"),
        (idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00", "trailing bytes"),
    ],
)
def test_idx_parser_rejects_bad_files(data: bytes, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        parse_idx(data, source="bad-idx")


# --------------------------------------------------------------------------- checksums


def test_verify_file_checksum_mismatch(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "binarized_mnist_test.amat"
    path.write_bytes(b"0 1\n")
    good = download.RemoteFile(name=path.name, urls=(), content_md5=md5(b"0 1\n"))
    download.verify_file(path, good)  # passes
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as info:
        download.verify_file(path, dataclasses.replace(good, content_md5=wrong))
    err = info.value
    assert err.expected == wrong and err.actual == md5(b"0 1\n")
    assert str(path) in str(err) and wrong in str(err) and md5(b"0 1\n") in str(err)
    assert isinstance(err, DataError)


def test_verify_gzip_file_by_file_or_content_md5(tmp_path: pathlib.Path) -> None:
    raw = b"some IDX content"
    gz = gzip.compress(raw, mtime=0)
    path = tmp_path / "f.gz"
    path.write_bytes(gz)
    remote = download.RemoteFile(name="f.gz", urls=(), content_md5=md5(raw), gzip_md5=md5(gz))
    assert download.read_verified(path, remote) == raw
    # A re-compressed copy (different .gz bytes) passes by its content md5.
    path.write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    assert md5(path.read_bytes()) != md5(gz)
    assert download.read_verified(path, remote) == raw
    # Corrupt content: the error names both the gzip and the content md5s.
    bad = gzip.compress(b"other content", mtime=0)
    path.write_bytes(bad)
    with pytest.raises(ChecksumError) as info:
        download.read_verified(path, remote)
    message = str(info.value)
    assert md5(gz) in message and md5(bad) in message and md5(b"other content") in message


def test_verification_is_cached_by_path_size_mtime(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.amat"
    path.write_bytes(b"0 1\n")
    remote = download.RemoteFile(name="f.amat", urls=(), content_md5=md5(b"0 1\n"))
    calls = []
    real_md5 = download.md5_hex
    monkeypatch.setattr(download, "md5_hex", lambda data: calls.append(1) or real_md5(data))
    download.verify_file(path, remote)
    download.verify_file(path, remote)
    assert len(calls) == 1
    path.write_bytes(b"1 1\n")  # same size, new content: the mtime changes
    os.utime(path, ns=(1, 1))
    with pytest.raises(ChecksumError):
        download.verify_file(path, remote)
    assert len(calls) == 2


def test_local_files_load_and_are_verified(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """binarized-mnist from tiny local files: the subfolder and the data folder itself are searched."""
    arrays = {"train": RNG.integers(0, 2, (6, 784)), "valid": RNG.integers(0, 2, (2, 784)), "test": RNG.integers(0, 2, (3, 784))}
    (tmp_path / "binarized-mnist").mkdir()
    for split, rows in arrays.items():
        text = amat_text(rows)
        folder = tmp_path / "binarized-mnist" if split == "train" else tmp_path
        name = f"binarized_mnist_{split}.amat" + (".gz" if split != "valid" else "")
        (folder / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
        remote = dataclasses.replace(sources.BINARIZED_MNIST_FILES[split], content_md5=md5(text))
        monkeypatch.setitem(sources.BINARIZED_MNIST_FILES, split, remote)
    ds = load_dataset("binarized-mnist", tmp_path, download=False)
    assert ds.binary and ds.image_shape == (28, 28) and ds.train_labels is None
    for split, rows in arrays.items():
        np.testing.assert_array_equal(getattr(ds, split).numpy(), rows)
    # A local file that does not match the published md5 is refused.
    bad = "f" * 32
    monkeypatch.setitem(sources.BINARIZED_MNIST_FILES, "test", dataclasses.replace(sources.BINARIZED_MNIST_FILES["test"], content_md5=bad))
    with pytest.raises(ChecksumError) as info:
        load_dataset("binarized-mnist", tmp_path, download=False)
    assert "binarized_mnist_test.amat.gz" in str(info.value) and bad in str(info.value)
    assert md5(amat_text(arrays["test"])) in str(info.value)


# --------------------------------------------------------------------------- missing files


def test_missing_files_without_download(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MissingDataError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    for remote in sources.MNIST_FILES.values():
        assert remote.name in message
        for url in remote.urls:
            assert url in message
    assert str(tmp_path / "mnist") in message
    assert "--data-dir" in message and DATA_ENV_VAR in message and "download=False" in message
    assert not (tmp_path / "mnist").exists()  # nothing created without download


def test_missing_files_when_download_fails(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_download(remote: download.RemoteFile, dest_dir: os.PathLike[str], **kwargs: object) -> pathlib.Path:
        raise DataError(f"could not download {remote.name}: server on fire")

    monkeypatch.setattr(download, "download_file", failing_download)
    with pytest.raises(MissingDataError) as info:
        load_dataset("binarized-mnist", tmp_path)
    message = str(info.value)
    for split in ("train", "valid", "test"):
        assert f"binarized_mnist_{split}.amat" in message
    assert "server on fire" in message and sources.BINARIZED_MNIST_URL in message
    assert str(tmp_path / "binarized-mnist") in message and DATA_ENV_VAR in message


def test_missing_files_when_network_is_down(tmp_path: pathlib.Path) -> None:
    """With the real download function and urlopen failing, every mirror is tried and named."""
    with pytest.raises(MissingDataError) as info:
        load_dataset("mnist-binarized", tmp_path / "new" / "data")
    message = str(info.value)
    assert "network disabled in tests" in message
    for mirror in sources.MNIST_MIRRORS:
        assert mirror + "t10k-labels-idx1-ubyte.gz" in message
    assert message.count("network disabled in tests") == 8  # 4 files x 2 mirrors, each with its reason
    assert list(tmp_path.iterdir()) == []  # no partial files, no empty folders left


def test_some_files_missing_names_only_those(tmp_path: pathlib.Path, fake_mnist: dict[str, bytes]) -> None:
    (tmp_path / "mnist").mkdir()
    for url, payload in fake_mnist.items():
        if "labels" not in url:
            (tmp_path / "mnist" / url.rsplit("/", 1)[1]).write_bytes(payload)
    with pytest.raises(MissingDataError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "train-images" not in message and "2 file(s) missing" in message


# --------------------------------------------------------------------------- download


def test_download_lands_verified_and_loads(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, fake_mnist: dict[str, bytes]) -> None:
    requested = serve(monkeypatch, fake_mnist)
    previous = os.umask(0o022)
    try:
        ds = load_dataset("mnist", tmp_path)
    finally:
        os.umask(previous)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(u.rsplit("/", 1)[1] for u in fake_mnist)
    # downloaded files are readable as any new file is (not private to the downloader, as mkstemp makes them)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "mnist").iterdir()} == {0o644}
    assert len(requested) == 4
    # The values: pixels / 255, valid = the last MNIST_VALID_SIZE (patched: 2) training images.
    images = FAKE_MNIST["train_images"].reshape(12, -1) / 255.0
    np.testing.assert_allclose(ds.train.numpy(), images[:10], rtol=1e-6)
    np.testing.assert_allclose(ds.valid.numpy(), images[10:], rtol=1e-6)
    np.testing.assert_array_equal(ds.test_labels.numpy(), FAKE_MNIST["test_labels"])
    assert ds.train_labels.dtype == torch.int64 and ds.num_classes == 10 and not ds.binary
    # A second load uses the local files: no further requests.
    load_dataset("mnist", tmp_path)
    assert len(requested) == 4


def test_download_tries_the_next_mirror(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, fake_mnist: dict[str, bytes]) -> None:
    second = {url.replace(sources.MNIST_MIRRORS[0], sources.MNIST_MIRRORS[1]): data for url, data in fake_mnist.items()}
    requested = serve(monkeypatch, second)
    load_dataset("mnist", tmp_path)
    assert len(requested) == 8 and requested[0].startswith(sources.MNIST_MIRRORS[0])
    assert len(list((tmp_path / "mnist").iterdir())) == 4


def test_corrupted_download_is_rejected_and_removed(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, fake_mnist: dict[str, bytes]) -> None:
    url = sources.MNIST_FILES["train_images"].urls[0]
    corrupt = dict(fake_mnist)
    corrupt[url] = gzip.compress(b"not the right bytes")
    serve(monkeypatch, corrupt)
    with pytest.raises(ChecksumError) as info:
        load_dataset("mnist", tmp_path)
    err = info.value
    assert "train-images-idx3-ubyte.gz" in str(err) and "deleted" in str(err)
    assert err.expected == sources.MNIST_FILES["train_images"].gzip_md5 and err.expected in str(err)
    assert err.actual == md5(corrupt[url]) and err.actual in str(err)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # neither the file nor a partial download


def test_mnist_binarized_binarizes_eval_splits_once(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, fake_mnist: dict[str, bytes]) -> None:
    serve(monkeypatch, fake_mnist)
    grey = load_dataset("mnist", tmp_path)
    a = load_dataset("mnist-binarized", tmp_path)
    b = load_dataset("mnist-binarized", tmp_path)
    assert a.dynamic_binarization and not grey.dynamic_binarization
    assert torch.equal(a.train, grey.train)  # train stays grayscale; the trainer resamples it
    for split in ("valid", "test"):
        x = getattr(a, split)
        assert set(x.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(x, getattr(b, split))  # fixed seed: deterministic evaluation
    assert ((a.test == 1) <= (grey.test > 0)).all() and ((a.test == 0) <= (grey.test < 1)).all()


def test_bad_idx_magic_in_mnist_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, fake_mnist: dict[str, bytes]) -> None:
    """A label file in place of an image file (correct md5, wrong header) is refused."""
    raw = idx_bytes(FAKE_MNIST["test_labels"])
    remote = dataclasses.replace(sources.MNIST_FILES["test_images"], gzip_md5=None, content_md5=md5(raw))
    monkeypatch.setitem(sources.MNIST_FILES, "test_images", remote)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte").write_bytes(raw)  # uncompressed name accepted
    serve(monkeypatch, fake_mnist)
    with pytest.raises(DataError, match="magic number 2051"):
        load_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------- .npy / .npz


def test_npy_file_is_split_like_digits(tmp_path: pathlib.Path) -> None:
    x = RNG.random((40, 3, 4)).astype(np.float64)
    np.save(tmp_path / "d.npy", x)
    ds = load_dataset(str(tmp_path / "d.npy"))
    assert ds.image_shape == (3, 4) and ds.num_features == 12 and ds.train.dtype == torch.float32
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (31, 3, 6)
    rows = torch.cat([ds.train, ds.valid, ds.test])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x.reshape(40, -1).astype(np.float32).tolist()))
    assert torch.equal(ds.test, load_dataset(tmp_path / "d.npy").test)
    # A relative path is also looked up in the data folder.
    assert torch.equal(ds.train, load_dataset("d.npy", tmp_path).train)


def test_npy_with_nan_or_inf_is_refused(tmp_path: pathlib.Path) -> None:
    x = np.zeros((30, 5), dtype=np.float32)
    x[3, 1] = np.nan
    x[7, 2] = np.inf
    x[8, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match=r"non-finite") as info:
        load_dataset(str(tmp_path / "nan.npy"))
    assert "nan.npy" in str(info.value)
    np.savez(tmp_path / "nan.npz", train=np.ones((4, 2)), valid=np.ones((2, 2)), test=np.array([[0.0, np.nan]] * 2))
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "nan.npz"))
    assert "'test'" in str(info.value) and "2 non-finite value(s) (2 NaN, 0 inf)" in str(info.value)


def test_npz_layouts(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "full.npz"
    np.savez(
        path,
        train=np.ones((5, 2, 2)), valid=np.zeros((2, 2, 2)), test=np.ones((3, 2, 2)),
        train_labels=np.array([0, 1, 2, 1, 0]), valid_labels=np.array([4, 0]), test_labels=np.array([1.0, 2.0, 3.0]),
    )
    ds = load_dataset(str(path))
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (5, 2, 3)
    assert ds.binary and ds.num_classes == 5 and ds.image_shape == (2, 2)
    assert ds.test_labels.dtype == torch.int64 and ds.test_labels.tolist() == [1, 2, 3]

    np.savez(tmp_path / "xy.npz", x=np.arange(60.0).reshape(20, 3) / 60, y=np.arange(20) % 3)
    ds = load_dataset(str(tmp_path / "xy.npz"))
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (15, 2, 3) and not ds.binary
    assert ds.num_classes == 3 and ds.image_shape is None

    np.savez(tmp_path / "tt.npz", train=np.ones((20, 4)), test=np.ones((4, 4)))
    ds = load_dataset(str(tmp_path / "tt.npz"), valid_fraction=0.25)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (15, 5, 4) and ds.train_labels is None


def test_npz_with_wrong_keys_lists_keys(tmp_path: pathlib.Path) -> None:
    np.savez(tmp_path / "bad.npz", training=np.ones((4, 2)), val=np.ones((2, 2)))
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "bad.npz"))
    message = str(info.value)
    assert "['training', 'val']" in message  # the keys found
    for expected in ("'train'", "'valid'", "'test'", "'x'"):
        assert expected in message


def test_npz_mismatched_shapes_and_missing_file(tmp_path: pathlib.Path) -> None:
    np.savez(tmp_path / "m.npz", train=np.ones((4, 2)), valid=np.ones((2, 3)), test=np.ones((2, 2)))
    with pytest.raises(DataError, match="'valid'"):
        load_dataset(str(tmp_path / "m.npz"))
    np.savez(tmp_path / "l.npz", x=np.ones((20, 2)), y=np.arange(19))
    with pytest.raises(DataError, match="expected 20 labels"):
        load_dataset(str(tmp_path / "l.npz"))
    np.savez(tmp_path / "p.npz", train=np.ones((4, 2)), test=np.ones((2, 2)), train_labels=np.arange(4))
    with pytest.raises(DataError, match="labels for some splits only"):
        load_dataset(str(tmp_path / "p.npz"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope.npy"))


def test_damaged_foreign_and_unrepresentable_array_files_are_refused_by_name(tmp_path: pathlib.Path) -> None:
    x = np.ones((40, 3), np.float32)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    np.savez(tmp_path / "crc.npz", x=x)
    data = bytearray((tmp_path / "crc.npz").read_bytes())
    data[200] ^= 0xFF  # a flipped byte inside the stored array: a bad CRC-32
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    np.savez(tmp_path / "archive.npy", x=x)  # np.savez keeps the name it is given
    (tmp_path / "archive.npy.npz").rename(tmp_path / "archive.npy")
    np.save(tmp_path / "array.npy", x)
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    np.save(tmp_path / "no_features.npy", np.zeros((40, 0), np.float32))
    np.save(tmp_path / "huge.npy", np.full((40, 3), 1e300))
    np.savez(tmp_path / "wide_labels.npz", x=x, y=np.full(40, 2**63 + 5, dtype=np.uint64))
    for name, message in (("garbage.npz", "cannot read as .npz (BadZipFile"),
                          ("crc.npz", "Bad CRC-32"),
                          ("archive.npy", "holds an .npz archive, not what its suffix .npy says; rename it to .npz"),
                          ("array.npz", "holds one .npy array, not what its suffix .npz says; rename it to .npy"),
                          ("no_features.npy", "examples of 0 features"),
                          ("huge.npy", "values reach |x| = 1e+300, beyond float32's largest"),
                          ("wide_labels.npz", "label 9223372036854775813 does not fit in int64")):
        with pytest.raises(DataError, match=re.escape(message)):
            load_dataset(str(tmp_path / name))


# --------------------------------------------------------------------------- Dataset


def test_check_unit_interval_reports_min_max() -> None:
    x = torch.tensor([[0.0, 2.5], [-0.5, 1.0]])
    ds = Dataset("toy", x, x[:1], x[:1], None, None, None, None, False, False, None)
    with pytest.raises(DataError) as info:
        ds.check_unit_interval()
    assert "-0.5" in str(info.value) and "2.5" in str(info.value) and "'toy'" in str(info.value)
    ok = Dataset("ok", x.clamp(0, 1), x[:1].clamp(0, 1), x[:1].clamp(0, 1), None, None, None, None, False, False, None)
    ok.check_unit_interval()


def test_dataset_invariants() -> None:
    x = torch.zeros(3, 4)
    with pytest.raises(DataError, match="features"):
        Dataset("d", x, torch.zeros(2, 5), x, None, None, None, None, False, False, None)
    with pytest.raises(DataError, match="binary=True"):
        Dataset("d", x + 0.5, x, x, None, None, None, None, True, False, None)
    with pytest.raises(DataError, match="labels"):
        Dataset("d", x, x, x, torch.zeros(2, dtype=torch.int64), None, None, None, False, False, None)
    with pytest.raises(DataError, match="image_shape"):
        Dataset("d", x, x, x, None, None, None, (3, 3), False, False, None)
    assert "num_features=4" in repr(Dataset("d", x, x, x, None, None, None, (2, 2), True, False, None))


# --------------------------------------------------------------------------- data folder


def test_resolve_data_dir_precedence(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv(DATA_ENV_VAR)
    assert resolve_data_dir() == tmp_path / "xdg" / "pyro-vae" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "pyro-vae" / "data"
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel") == tmp_path / "rel"  # always absolute


# --------------------------------------------------------------------------- real data

REAL_DATA = os.environ.get(DATA_ENV_VAR, "")
needs_real_data = pytest.mark.skipif(not REAL_DATA, reason=f"{DATA_ENV_VAR} is not set (CI sets it)")


@needs_real_data
def test_real_binarized_mnist() -> None:
    # download=False: missing files must fail here (quickly), not skip.
    ds = load_dataset("binarized-mnist", download=False)
    assert ds.train.shape == (50000, 784) and ds.valid.shape == (10000, 784) and ds.test.shape == (10000, 784)
    assert ds.binary
    assert abs(float(ds.train.mean()) - 0.13056) < 1e-4
    assert abs(float(ds.valid.mean()) - 0.13113) < 1e-4
    assert abs(float(ds.test.mean()) - 0.13251) < 1e-4


@needs_real_data
def test_real_mnist_and_mnist_binarized() -> None:
    ds = load_dataset("mnist", download=False)
    assert ds.train.shape == (50000, 784) and ds.valid.shape == (10000, 784) and ds.test.shape == (10000, 784)
    assert ds.test_labels.shape == (10000,) and ds.num_classes == 10
    assert float(ds.train.min()) == 0.0 and float(ds.train.max()) == 1.0 and not ds.binary
    assert torch.bincount(ds.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Mean pixel over all 60,000 training images is the well-known 0.1307.
    assert abs(float(torch.cat([ds.train, ds.valid]).mean()) - 0.1307) < 1e-4
    db = load_dataset("mnist-binarized", download=False)
    assert db.dynamic_binarization and torch.equal(db.train, ds.train)
    assert set(db.test.unique().tolist()) == {0.0, 1.0}
    assert abs(float(db.test.mean()) - float(ds.test.mean())) < 2e-3
