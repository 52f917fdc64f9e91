"""Where shards come from: local paths, or WebDataset-style URLs and specs.

Accepted wherever a dataset folder or shard glob is: ``http(s)://``, ``file://``, ``pipe:CMD`` (the
command writes the shard to stdout), and other schemes (``s3://``, ``gs://``, ...) through ``fsspec``
where installed, else through ``webdataset.gopen``; brace ranges (``shards-{000000..000099}.tar``) in
any of them and in local paths. A URL ending in ``/`` (or without a ``.tar``) names a dataset folder:
its ``manifest.json`` lists the shards. A shard's manifest is the ``manifest.json`` beside it, fetched
through the same opener (for ``pipe:``, the command with the shard's file name replaced).

HTTP is read with the standard library, so a missing file is an error that says 404 rather than an
empty stream; opening is retried with backoff on connection errors and 5xx answers.
"""

from __future__ import annotations

import re
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import braceexpand

from .format import MANIFEST_NAME, SHARD_NAME, DataError

_REMOTE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]+://|pipe:)")
_TAR_NAME = re.compile(r"[^\s/'\"]+\.tar\b")
OPEN_RETRIES = 3
OPEN_BACKOFF_S = 1.0
TIMEOUT_S = 60.0


def is_remote(spec: str) -> bool:
    return bool(_REMOTE.match(spec))


def expand(spec: str) -> list[str]:
    """Brace ranges and lists: ``a-{000..002}.tar`` -> three names (the spec itself if it has none)."""
    return list(braceexpand.braceexpand(spec))


def shard_name(url: str) -> str:
    """The shard's file name inside a URL or pipe command."""
    names = _TAR_NAME.findall(url)
    if not names:
        raise DataError(f"{url}: names no .tar shard")
    return names[-1]


def is_folder(url: str) -> bool:
    """A URL that names a dataset folder (no .tar in it), whose manifest lists the shards."""
    return not _TAR_NAME.search(url)


def manifest_location(url: str) -> str:
    """The manifest beside a shard (or inside a folder URL), reachable through the same opener."""
    if is_folder(url):
        return url.rstrip("/") + "/" + MANIFEST_NAME
    name = shard_name(url)
    head, _, tail = url.rpartition(name)
    return head + MANIFEST_NAME + tail


def shard_location(folder_url: str, name: str) -> str:
    """A shard of a folder URL. ``name`` comes from a manifest (others' data) and is a plain file name
    (Manifest.problems); in a ``pipe:`` command it is also shell-quoted, whatever it holds."""
    if not SHARD_NAME.fullmatch(name):
        raise DataError(f"{folder_url}: shard name {name!r} is not a plain .tar file name")
    return folder_url.rstrip("/") + "/" + (shlex.quote(name) if folder_url.startswith("pipe:") else name)


def open_stream(url: str, *, retries: int = OPEN_RETRIES, backoff_s: float = OPEN_BACKOFF_S,
                timeout_s: float = TIMEOUT_S) -> IO[bytes]:
    """A binary stream of a remote ``url`` (``file://`` sources are resolved as local paths, local_path).
    Opening is retried ``retries`` times with doubling waits on
    connection errors and server errors; a missing file (404 and other 4xx) fails at once. Errors are
    DataErrors that name the URL."""
    for attempt in range(retries + 1):
        try:
            return _open_once(url, timeout_s)
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == retries:
                raise DataError(f"{url}: HTTP {error.code} {error.reason}") from error
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            if attempt == retries:
                raise DataError(f"{url}: cannot open after {retries + 1} attempts ({error})") from error
            reason = str(error)
        wait = backoff_s * 2**attempt
        time.sleep(wait)
    raise AssertionError(f"unreachable: {url} ({reason})")


def _open_once(url: str, timeout_s: float) -> IO[bytes]:
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 -- the scheme is checked above
    if not url.startswith("pipe:"):
        try:
            import fsspec
        except ImportError:
            fsspec = None
        if fsspec is not None:
            return fsspec.open(url, "rb").open()
    import webdataset

    return webdataset.gopen(url, "rb")


def read_bytes(url: str) -> bytes:
    stream = open_stream(url)
    try:
        return stream.read()
    except Exception as error:
        raise DataError(f"{url}: read failed ({error})") from error
    finally:
        close(stream, url)


def read_text(url: str) -> str:
    return read_bytes(url).decode()


class StreamError(DataError):
    """A remote stream failed after it opened (e.g. a pipe command that exits non-zero)."""


def close(stream: IO[bytes], url: str) -> None:
    """Close, turning a pipe command's failure (webdataset raises it at close) into a named error."""
    try:
        stream.close()
    except Exception as error:
        raise StreamError(f"{url}: {error}") from error


CACHE_ENV = "UNITER_DS_SHARD_CACHE"


def cached_copy(url: str, expected_bytes: int, cache_dir: str | Path) -> Path:
    """A local copy of a remote shard under ``cache_dir`` (downloaded once, checked against the
    manifest's size; written to a temporary name and renamed, so concurrent readers and a killed
    download never leave a partial shard under the final name)."""
    import hashlib
    import os

    folder = Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]
    path = folder / shard_name(url)
    if path.exists() and path.stat().st_size == expected_bytes:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{path.name}.{os.getpid()}.part"
    stream = open_stream(url)
    try:
        with open(partial, "wb") as out:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
        close(stream, url)
        size = partial.stat().st_size
        if size != expected_bytes:
            raise DataError(f"{url}: downloaded {size} bytes, the manifest says {expected_bytes}")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def local_path(spec: str) -> Path | None:
    """``file://`` URLs and plain paths are local files; other URLs are not."""
    if spec.startswith("file://"):
        return Path(spec[len("file://"):])
    return None if is_remote(spec) else Path(spec)
