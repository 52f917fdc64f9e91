"""A minimal streaming tar reader for shards: the members in order, as (name, bytes).

Python's ``tarfile`` spends most of a sample's decoding budget parsing headers; shards are plain
tar files (USTAR, written by ``DatasetWriter`` or by WebDataset's tools), so this reads the 512-byte
headers directly: regular files, PAX ``path`` records and GNU long names; checksums are verified, and
a file that ends inside a member or header is an error rather than a quiet end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

BLOCK = 512


class TarFormatError(ValueError):
    pass


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    try:
        return int(field, 8) if field else 0
    except ValueError:  # a damaged header: a shard error, not a crash of the caller
        raise TarFormatError(f"bad number field {bytes(field[:12])!r} in a tar header") from None


def iter_tar(path: str | Path, buffer_size: int = 1 << 20) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb", buffering=buffer_size) as f:
        yield from iter_tar_stream(f)


def _read_exactly(f: IO[bytes], size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream: a network stream returns short reads."""
    data = f.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = f.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def iter_tar_stream(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """The members of a tar read from a binary stream (a file, an HTTP response, a pipe)."""
    for name, data, _start, _end in iter_tar_members(f):
        yield name, data


def iter_tar_members(f: IO[bytes], offset: int = 0) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, data, start, end) of each member, ``start`` the byte offset of its first header (a long-name
    header included) and ``end`` that of whatever follows it: a reader can later seek to ``start`` and
    read the member again. ``offset``: where ``f`` stands in the tar (a stream opened mid-file)."""
    long_name: str | None = None
    member_start = offset
    while True:
        header = _read_exactly(f, BLOCK)
        if len(header) == 0:
            raise TarFormatError(f"file ends at byte {offset} without the end-of-archive marker")
        if len(header) < BLOCK:
            raise TarFormatError(f"file ends inside a header at byte {offset}")
        if header == b"\0" * BLOCK:
            return
        if long_name is None:
            member_start = offset
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError(f"bad header checksum at byte {offset}")
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exactly(f, size)
        if len(data) < size:
            raise TarFormatError(f"file ends inside member data at byte {offset + BLOCK + len(data)}")
        if padded > size:
            _read_exactly(f, padded - size)
        offset += BLOCK + padded
        if kind in (b"L",):  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind in (b"x",):  # PAX extended header: take its path record for the next member
            for record in data.decode().split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: no sample data
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[0:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:263] == b"ustar\x00" else ""
            if prefix:
                name = f"{prefix}/{name}"
        yield name, data, member_start, offset
