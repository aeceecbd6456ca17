"""Fetching data files and verifying them against published md5 checksums.

:func:`ensure_files` finds each file of a data set locally (in
``<data_dir>/<subfolder>/`` then ``<data_dir>/``) or downloads it;
:func:`read_verified` reads a file and checks its md5. Verifications are
cached in-process by (path, size, mtime), because the shared data folder may be
read-only (no sidecar files) and hashing once per process is enough.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import ChecksumError, DataError, DownloadError, MissingDataError
from .formats import is_gzip, maybe_gunzip
from .paths import DATA_ENV_VAR, new_file_mode

logger = logging.getLogger(__name__)

#: Seconds to wait for a server before trying the next URL.
DOWNLOAD_TIMEOUT = 30.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A published data file.

    ``name`` is the file name as published (and as saved when downloaded);
    ``urls`` are tried in turn. ``content_md5`` is the md5 of the uncompressed
    content; ``gzip_md5`` that of the published ``.gz`` file, when it is one.
    ``local_names`` are the names accepted on disk, e.g. with or without
    ``.gz`` (a gzip file is recognised by content, whatever its name).
    """

    name: str
    urls: tuple[str, ...]
    content_md5: str
    gzip_md5: str | None = None
    local_names: tuple[str, ...] = ()

    @property
    def accepted_names(self) -> tuple[str, ...]:
        """All file names looked for, the published one first."""
        return (self.name, *(n for n in self.local_names if n != self.name))


# (resolved path, size, mtime_ns, expected md5s) of files that passed verification.
_VERIFIED: set[tuple[str, int, int, str, str | None]] = set()


def clear_checksum_cache() -> None:
    """Forget which files were verified (the next read hashes them again)."""
    _VERIFIED.clear()


def md5_hex(data: bytes) -> str:
    """md5 hex digest of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _cache_key(path: pathlib.Path, remote: RemoteFile) -> tuple[str, int, int, str, str | None]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, remote.content_md5, remote.gzip_md5)


def verify_bytes(raw: bytes, remote: RemoteFile, label: str) -> bytes:
    """Check the md5 of a file's bytes ``raw`` and return its uncompressed content.

    A gzip file passes if its own md5 equals ``remote.gzip_md5`` or if its
    decompressed content matches ``remote.content_md5`` (a re-compressed copy);
    a plain file must match ``remote.content_md5``. Raises :class:`ChecksumError`
    naming ``label``, the expected and the actual md5 otherwise.
    """
    if is_gzip(raw):
        file_md5 = md5_hex(raw)
        content = maybe_gunzip(raw, label)
        if remote.gzip_md5 is not None and file_md5 == remote.gzip_md5:
            return content
        content_md5 = md5_hex(content)
        if content_md5 == remote.content_md5:
            return content
        if remote.gzip_md5 is not None:
            raise ChecksumError(
                label,
                remote.gzip_md5,
                file_md5,
                f"Checksum mismatch for {label}: expected md5 {remote.gzip_md5} (published "
                f"{remote.name}), got {file_md5}; its decompressed content has md5 "
                f"{content_md5}, expected {remote.content_md5}. The file is corrupt or is "
                f"not {remote.name}; delete it and download it again.",
            )
        raise ChecksumError(
            label,
            remote.content_md5,
            content_md5,
            f"Checksum mismatch for {label}: expected md5 {remote.content_md5} for the "
            f"decompressed content (as for the published {remote.name}), got {content_md5} "
            f"(md5 of the gzip file itself: {file_md5}). The file is corrupt or is not "
            f"{remote.name}; delete it and download it again.",
        )
    actual = md5_hex(raw)
    if actual == remote.content_md5:
        return raw
    raise ChecksumError(
        label,
        remote.content_md5,
        actual,
        f"Checksum mismatch for {label}: expected md5 {remote.content_md5}"
        f"{' (uncompressed content)' if remote.gzip_md5 else ''}, got {actual}. The file is "
        f"corrupt or is not {remote.name}; delete it and download it again.",
    )


def verify_file(path: str | os.PathLike[str], remote: RemoteFile) -> None:
    """Raise :class:`ChecksumError` unless the file at ``path`` matches ``remote``'s md5."""
    read_verified(path, remote)


def read_verified(path: str | os.PathLike[str], remote: RemoteFile) -> bytes:
    """Read a local file, verify its md5 (cached per process) and return its content.

    The content is decompressed when the file is gzip.
    """
    path = pathlib.Path(path)
    key = _cache_key(path, remote)
    raw = path.read_bytes()
    if key in _VERIFIED:
        return maybe_gunzip(raw, str(path))
    content = verify_bytes(raw, remote, str(path))
    _VERIFIED.add(key)
    return content


def find_local(remote: RemoteFile, folders: Sequence[pathlib.Path]) -> pathlib.Path | None:
    """The first existing file among ``folders`` x ``remote.accepted_names``, or None."""
    for folder in folders:
        for name in remote.accepted_names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


@contextlib.contextmanager
def _progress(total: int | None, desc: str) -> Iterator[object]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        class _NoBar:
            def update(self, n: int) -> None:
                pass

        yield _NoBar()
        return
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar


def _fetch(url: str, remote: RemoteFile, dest_dir: pathlib.Path, timeout: float) -> pathlib.Path:
    """Download one URL to a temporary file, verify it, rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{remote.name}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            headers = getattr(response, "headers", None)
            length = headers.get("Content-Length") if headers is not None else None
            total = int(length) if length and str(length).isdigit() else None
            with _progress(total, remote.name) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        raw = tmp.read_bytes()
        try:
            verify_bytes(raw, remote, f"downloaded file {remote.name} (from {url})")
        except ChecksumError as exc:
            raise ChecksumError(
                exc.path, exc.expected, exc.actual, f"{exc} The corrupt download was deleted."
            ) from None
        final = dest_dir / remote.name
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _VERIFIED.add(_cache_key(final, remote))
    return final


def download_file(remote: RemoteFile, dest_dir: str | os.PathLike[str], *, timeout: float = DOWNLOAD_TIMEOUT) -> pathlib.Path:
    """Download ``remote`` into ``dest_dir`` (trying each URL in turn) and verify it.

    The file is written to a temporary name and atomically renamed, so an
    interrupted download never leaves a partial file under the real name.
    Raises :class:`ChecksumError` if a server sent corrupt data (the file is
    deleted) and no other URL worked, :class:`DownloadError` listing each URL and
    its error if none could be fetched.
    """
    dest = pathlib.Path(dest_dir)
    new_dirs = [d for d in (dest, *dest.parents) if not d.exists()]  # deepest first
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create folder {dest} to download {remote.name} into: {exc}") from exc
    failures: list[tuple[str, str]] = []
    checksum_error: ChecksumError | None = None
    try:
        for url in remote.urls:
            logger.info("downloading %s to %s", url, dest)
            try:
                return _fetch(url, remote, dest, timeout)
            except ChecksumError as exc:
                checksum_error = exc
                failures.append((url, f"checksum mismatch (expected {exc.expected}, got {exc.actual})"))
            except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad URLs
                failures.append((url, str(exc)))
    finally:
        for folder in new_dirs:  # leave no empty folders behind after a failed download
            with contextlib.suppress(OSError):  # not empty: the download worked
                folder.rmdir()
    if checksum_error is not None:
        raise checksum_error
    raise DownloadError(
        f"could not download {remote.name}:\n" + "\n".join(f"  {url}: {why}" for url, why in failures),
        failures,
    )


def ensure_files(
    dataset: str,
    files: Sequence[RemoteFile],
    data_dir: pathlib.Path,
    subfolder: str,
    *,
    download: bool = True,
) -> list[pathlib.Path]:
    """Return the local path of each of ``files``, downloading the missing ones.

    Looks in ``<data_dir>/<subfolder>/`` then ``<data_dir>/``; downloads go to
    ``<data_dir>/<subfolder>/``. Raises :class:`MissingDataError` naming every
    missing file, the URLs tried and the folder to put them in.
    """
    target = data_dir / subfolder
    folders = [target, data_dir]
    found: list[pathlib.Path | None] = [find_local(f, folders) for f in files]
    failures: dict[str, DataError | OSError] = {}
    if download:
        for i, remote in enumerate(files):
            if found[i] is None:
                try:
                    found[i] = download_file(remote, target)
                except ChecksumError:
                    raise
                except (DataError, OSError) as exc:
                    failures[remote.name] = exc
    missing = [f for f, path in zip(files, found) if path is None]
    if missing:
        raise MissingDataError(_missing_message(dataset, missing, failures, target, data_dir, download))
    return [p for p in found if p is not None]


def _missing_message(
    dataset: str,
    missing: Sequence[RemoteFile],
    failures: dict[str, DataError | OSError],
    target: pathlib.Path,
    data_dir: pathlib.Path,
    download: bool,
) -> str:
    lines = [f"Data set {dataset!r}: {len(missing)} file(s) missing from {target} (also looked in {data_dir}):"]
    for remote in missing:
        others = [n for n in remote.accepted_names if n != remote.name]
        lines.append(f"  - {remote.name}" + (f" (or {', '.join(others)})" if others else ""))
        error = failures.get(remote.name)
        reasons = dict(error.failures) if isinstance(error, DownloadError) else {}
        for url in remote.urls:
            if url in reasons:
                lines.append(f"      tried {url}: {reasons[url]}")
            else:
                lines.append(f"      {'tried' if error is not None else 'from'} {url}")
        if error is not None and not reasons:
            lines.append(f"      download failed: {error}")
    if download:
        lines.append("The download failed (no network?). Download the files by hand from the URLs above")
    else:
        lines.append("download=False, so nothing was downloaded. Download the files from the URLs above")
    lines.append(f"and put them in:\n  {target}")
    lines.append(
        f"or choose another data folder with --data-dir DIR or the {DATA_ENV_VAR} environment "
        f"variable (files are looked up in DIR/{target.name}/ and DIR/)."
    )
    return "\n".join(lines)
