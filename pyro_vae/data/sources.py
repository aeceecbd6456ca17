"""Where the published data files come from, and their md5 checksums."""

from __future__ import annotations

from .download import RemoteFile

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

#: MNIST mirrors, tried in turn.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


def _amat(split: str, md5: str) -> RemoteFile:
    name = f"binarized_mnist_{split}.amat"
    return RemoteFile(name=name, urls=(BINARIZED_MNIST_URL + name,), content_md5=md5, local_names=(name + ".gz",))


def _idx(stem: str, gzip_md5: str, content_md5: str) -> RemoteFile:
    name = stem + ".gz"
    return RemoteFile(
        name=name,
        urls=tuple(mirror + name for mirror in MNIST_MIRRORS),
        content_md5=content_md5,
        gzip_md5=gzip_md5,
        local_names=(stem,),
    )


#: Static binarized MNIST (Larochelle & Murray, 2011); md5 of the uncompressed .amat text.
BINARIZED_MNIST_FILES: dict[str, RemoteFile] = {
    "train": _amat("train", "db28b1a6ae0fe70cbd3da91acf46e477"),
    "valid": _amat("valid", "bf37822a04e94123630de6a7dfd9c9ef"),
    "test": _amat("test", "14e41ae11040adba6ab8cb291eda0dd8"),
}

#: MNIST IDX files; md5 of the published .gz files and of their decompressed content.
MNIST_FILES: dict[str, RemoteFile] = {
    "train_images": _idx("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": _idx("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "test_images": _idx("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": _idx("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}
