"""Data sets for pyro-vae, by name, with download and md5 verification.

>>> from pyro_vae.data import load_dataset
>>> ds = load_dataset("digits")          # bundled with scikit-learn, no download
>>> ds.train.shape, ds.image_shape
(torch.Size([1374, 64]), (8, 8))

Names: ``digits``, ``binarized-mnist`` (static, Larochelle & Murray 2011),
``mnist`` (grayscale), ``mnist-binarized`` (dynamic binarization, Burda et al.
2015), or a path to a ``.npy``/``.npz`` file. Files live in the data folder
chosen by :func:`resolve_data_dir` (``--data-dir`` > ``PYRO_VAE_DATA`` > user cache).
"""

from .dataset import Dataset
from .errors import ChecksumError, DataError, DownloadError, MissingDataError
from .paths import DATA_ENV_VAR, resolve_data_dir
from .registry import DATASET_NAMES, load_dataset

__all__ = [
    "DATASET_NAMES",
    "DATA_ENV_VAR",
    "ChecksumError",
    "DataError",
    "Dataset",
    "DownloadError",
    "MissingDataError",
    "load_dataset",
    "resolve_data_dir",
]
