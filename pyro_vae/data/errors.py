"""Typed errors raised by :mod:`pyro_vae.data`.

All of them derive from :class:`DataError` (a ``ValueError``), so callers can
catch every data problem with one ``except`` clause, and command-line tools can
print the message as is: each message says what is wrong and how to fix it.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data set could not be found, read or validated."""


class MissingDataError(DataError):
    """Files of a data set are missing locally and could not be downloaded."""


class DownloadError(DataError):
    """No URL of a file could be fetched; ``failures`` lists ``(url, reason)`` pairs."""

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class ChecksumError(DataError):
    """A file's md5 does not match the published checksum.

    ``path`` names the file, ``expected`` and ``actual`` hold the md5 hex digests.
    """

    def __init__(self, path: str | os.PathLike[str], expected: str, actual: str, message: str) -> None:
        super().__init__(message)
        self.path = str(path)
        self.expected = expected
        self.actual = actual
