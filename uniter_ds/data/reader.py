"""Streaming reader: dataset folders -> shards split across ranks and loader workers -> images -> pairs.

Sources are local folders, shard globs and brace ranges, or URLs and specs (``http(s)://``, ``pipe:``,
``s3://``, ...; see sources.py): a remote shard streams through its opener into the same tar parser.

Two ways to split, as WebDataset users know them:
- ``exact``: each epoch, the shard list is permuted with (seed, epoch), identically on every rank, and
  global worker g of G takes shards g, g + G, ...: every pair is read exactly once per epoch.
- ``resampled``: each global worker draws shards with replacement from its own seeded stream, forever;
  the caller bounds an epoch by a number of batches (WebDataset's ``with_epoch``). Reproducible for a seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import numpy as np

from . import sources as remote
from .format import ARRAY_FIELDS, REQUIRED_MEMBERS, DataError, Manifest, TokenizerInfo, load_npy
from .tario import TarFormatError, iter_tar_members


@dataclass
class Shard:
    path: Path | str  # a local file, or a URL / pipe spec
    images: int
    bytes: int
    manifest: Manifest
    origin: str = ""  # the dataset folder or URL it was listed under, for messages

    @property
    def name(self) -> str:
        return self.path.name if isinstance(self.path, Path) else remote.shard_name(self.path)

    @property
    def is_remote(self) -> bool:
        return not isinstance(self.path, Path)

    @property
    def size_on_disk(self) -> int | None:
        """A local shard's size in bytes, None when the file is missing."""
        return self.path.stat().st_size if self.path.exists() else None


@dataclass
class ImageRecord:
    key: str
    shard: str
    image_id: str
    feat: np.ndarray  # float16 [N, D]
    pos: np.ndarray  # float32 [N, 7]
    soft: np.ndarray | None  # float16 [N, C]
    captions: list[dict]
    extra: dict = field(default_factory=dict)  # the sample's other JSON fields (width, height, ...)
    # Where it was read: the shard as listed (URL or path), its index there, and the byte offsets of its
    # first header and of what follows it. A checkpoint refers to a held image by ``ref``, no bytes.
    location: str = ""
    index: int = -1
    start: int = -1
    end: int = -1

    @property
    def ref(self) -> ImageRef:
        return (self.location, self.start, self.index)


ImageRef = tuple[str, int, int]  # (shard location, byte offset, index in the shard)


@dataclass
class Pair:
    """One caption with its image: the unit of training."""

    image: ImageRecord
    caption_index: int
    input_ids: np.ndarray  # int64 [tl] with [CLS] and [SEP]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.image.feat)


# What ``ReaderStats.errors`` counts: a bad sample (skipped), one with NaN/inf arrays (skipped), and the
# ways a shard is lost whole or in part (cannot be opened/cached, size differs from the manifest, corrupt
# or truncated tar, fewer images than the manifest lists).
ERROR_KINDS = ("bad_sample", "nonfinite", "shard_open", "shard_size", "corrupt_shard", "image_count")


@dataclass
class ReaderStats:
    """Counts of everything read, skipped or dropped; nothing is dropped without a count here."""

    images: int = 0
    pairs: int = 0
    skipped_images: int = 0  # bad samples, skipped one by one
    corrupt_shards: int = 0  # shards missing, unreadable, truncated or holding fewer images than listed
    lost_images: int = 0  # the images of those shards that were not read (the manifest's count minus those read)
    dropped_long_captions: int = 0
    errors: Counter = field(default_factory=Counter)
    last_errors: list[str] = field(default_factory=list)

    def record(self, error: DataError, kind: str) -> None:
        assert kind in ERROR_KINDS, kind
        self.errors[kind] += 1
        self.last_errors = (self.last_errors + [str(error)])[-5:]

    def as_dict(self) -> dict:
        return {"images": self.images, "pairs": self.pairs, "skipped_images": self.skipped_images,
                "corrupt_shards": self.corrupt_shards, "lost_images": self.lost_images,
                "dropped_long_captions": self.dropped_long_captions,
                "errors": dict(self.errors), "last_errors": list(self.last_errors)}


def resolve_sources(sources: Sequence[str | Path] | Sequence[Shard]) -> list[Shard]:
    """Dataset folders (all their shards), shard globs or brace ranges, or the same as URLs and specs
    (sources.py) -> shards, with manifests.

    All sources must share the tokenizer and feature dims, since they end up in the same batches.
    """
    if sources and all(isinstance(source, Shard) for source in sources):
        return list(sources)  # resolved already (at the job's start): nothing to fetch again
    shards: list[Shard] = []
    manifests: dict[str, Manifest] = {}

    def manifest_of(location: str) -> Manifest:
        """A local dataset folder's manifest, or a manifest URL's; each read once."""
        if location not in manifests:
            manifests[location] = (Manifest.load(location) if remote.local_path(location) is not None
                                   else Manifest.from_text(remote.read_text(location), location))
        return manifests[location]

    for source in map(str, sources):
        local = remote.local_path(source)
        if local is None:
            shards += _remote_shards(source, manifest_of)
            continue
        if local.is_dir():
            manifest = manifest_of(str(local))
            shards += [Shard(local / s.name, s.images, s.bytes, manifest, str(local)) for s in manifest.shards]
            continue
        paths = sorted(p for spec in remote.expand(str(local)) for p in glob.glob(spec))
        if not paths:
            raise DataError(f"{source}: matches no dataset folder and no shard file")
        for path in map(Path, paths):
            manifest = manifest_of(str(path.parent))
            info = {s.name: s for s in manifest.shards}.get(path.name)
            if info is None:
                raise DataError(f"{path}: not listed in {path.parent}/manifest.json (a leftover or foreign file?)")
            shards.append(Shard(path, info.images, info.bytes, manifest, str(path.parent)))
    if not shards:
        raise DataError(f"no shards in {list(map(str, sources))}")
    first = shards[0].manifest
    for shard in shards[1:]:
        other = shard.manifest
        if (other.img_dim, other.img_pos_dim, other.tokenizer) != (first.img_dim, first.img_pos_dim, first.tokenizer):
            raise DataError(f"{shard.origin}: feature dims or tokenizer differ from {shards[0].origin} "
                            f"({other.img_dim} vs {first.img_dim}-d, tokenizer {other.tokenizer.name} vs "
                            f"{first.tokenizer.name}); they cannot share batches")
    return shards


def shards_to_json(shards: Sequence[Shard]) -> dict:
    """Resolved shards as JSON-ready data (each manifest once): what the job's start hands its ranks."""
    manifests: list[Manifest] = []
    index: dict[int, int] = {}
    listed = []
    for shard in shards:
        if id(shard.manifest) not in index:
            index[id(shard.manifest)] = len(manifests)
            manifests.append(shard.manifest)
        listed.append({"path": str(shard.path), "local": not shard.is_remote, "images": shard.images,
                       "bytes": shard.bytes, "manifest": index[id(shard.manifest)], "origin": shard.origin})
    return {"manifests": [m.to_dict() for m in manifests], "shards": listed}


def shards_from_json(data: dict, where: str) -> list[Shard]:
    """:func:`shards_to_json`'s data back as shards; ``where`` names it in errors."""
    manifests = [Manifest.from_text(json.dumps(m), f"{where} manifest {i}") for i, m in enumerate(data["manifests"])]
    return [Shard(Path(s["path"]) if s["local"] else s["path"], s["images"], s["bytes"], manifests[s["manifest"]],
                  s["origin"]) for s in data["shards"]]


def _remote_shards(spec: str, manifest_of) -> list[Shard]:
    found = []
    for url in remote.expand(spec):
        location = remote.manifest_location(url)
        manifest = manifest_of(location)
        if remote.is_folder(url):  # every shard its manifest lists
            found += [Shard(remote.shard_location(url, s.name), s.images, s.bytes, manifest, url)
                      for s in manifest.shards]
            continue
        info = {s.name: s for s in manifest.shards}.get(remote.shard_name(url))
        if info is None:
            raise DataError(f"{url}: not listed in {location}")
        found.append(Shard(url, info.images, info.bytes, manifest, location.rpartition("/")[0] or location))
    return found


class ShardCursor:
    """The shards one global worker reads in an epoch, in order, with its place saved and restored."""

    def __init__(self, shards: list[Shard], *, mode: str, seed: int, epoch: int, global_worker: int,
                 num_global_workers: int):
        self.shards, self.mode, self.taken = shards, mode, 0
        if mode == "exact":
            if len(shards) < num_global_workers:
                raise DataError(f"exact split needs at least as many shards ({len(shards)}) as ranks x loader "
                                f"workers ({num_global_workers}); write smaller shards or use resampled mode")
            order = list(range(len(shards)))
            random.Random(f"{seed}-{epoch}").shuffle(order)
            self.order = order[global_worker::num_global_workers]
        elif mode == "resampled":
            self.rng = random.Random(f"{seed}-{epoch}-{global_worker}")
        else:
            raise ValueError(f"split mode must be 'exact' or 'resampled', got {mode!r}")

    def next(self) -> Shard | None:
        """The next shard, or None at the end of an exact split's epoch (a resampled one has no end)."""
        if self.mode == "exact":
            if self.taken == len(self.order):
                return None
            shard = self.shards[self.order[self.taken]]
        else:
            shard = self.shards[self.rng.randrange(len(self.shards))]
        self.taken += 1
        return shard

    def state_dict(self) -> dict:
        return {"taken": self.taken} | ({"rng": self.rng.getstate()} if self.mode == "resampled" else {})

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]
        if self.mode == "resampled":
            self.rng.setstate(state["rng"])


def shards_for_worker(shards: list[Shard], **split) -> Iterator[Shard]:
    cursor = ShardCursor(shards, **split)
    while (shard := cursor.next()) is not None:
        yield shard


class NonFiniteSample(DataError):
    """A sample whose arrays hold NaN or inf: one such image turns a whole step's loss into NaN."""


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # inf/NaN have every exponent bit set; ~10x faster than np.isfinite on fp16
        return int((array.view(np.uint16) & 0x7FFF).max(initial=0)) < 0x7C00
    return bool(np.isfinite(array).all())


def _decode(key: str, members: dict[str, bytes], shard: Shard) -> ImageRecord:
    where = f"{shard.path}: sample {key!r}"
    missing = [m for m in REQUIRED_MEMBERS if m not in members]
    if missing:
        raise DataError(f"{where}: missing member(s) {missing}")
    try:
        arrays = {name: load_npy(members[f"{name}.npy"]) for name in ARRAY_FIELDS if f"{name}.npy" in members}
        meta = json.loads(members["json"])
    except (ValueError, OSError) as error:
        raise DataError(f"{where}: cannot decode ({error})") from error
    manifest = shard.manifest
    nonfinite = [name for name, array in arrays.items() if not _all_finite(array)]
    if nonfinite:
        raise NonFiniteSample(f"{where}: {', '.join(nonfinite)} hold NaN or inf")
    feat, pos, soft = arrays["feat"], arrays["pos"], arrays.get("soft")
    if feat.ndim != 2 or feat.shape[0] < 1 or feat.shape[1] != manifest.img_dim:
        raise DataError(f"{where}: feat has shape {feat.shape}, expected [N >= 1, {manifest.img_dim}]")
    if pos.shape != (feat.shape[0], manifest.img_pos_dim):
        raise DataError(f"{where}: pos has shape {pos.shape}, expected {(feat.shape[0], manifest.img_pos_dim)}")
    if manifest.img_label_dim is not None:
        if soft is None:
            raise DataError(f"{where}: missing member ['soft.npy'] (the manifest declares soft labels)")
        if soft.shape != (feat.shape[0], manifest.img_label_dim):
            raise DataError(f"{where}: soft has shape {soft.shape}, "
                            f"expected {(feat.shape[0], manifest.img_label_dim)}")
    captions = meta.get("captions")
    if not captions or any(not c.get("input_ids") for c in captions):
        raise DataError(f"{where}: no captions, or a caption without tokens")
    extra = {k: v for k, v in meta.items() if k not in ("image_id", "captions")}
    return ImageRecord(key, shard.name, str(meta.get("image_id", key)), feat, pos, soft, captions, extra)


def read_shard(shard: Shard, stats: ReaderStats, on_error: str = "raise",
               cache_dir: str | Path | None = None, start: tuple[int, int] = (0, 0)) -> Iterator[ImageRecord]:
    """The images of one shard, in order. Errors name the shard and the sample; with ``on_error='skip'``
    a bad sample is skipped and a corrupt or truncated shard ends early, each counted in ``stats``.
    ``cache_dir`` (default: the UNITER_DS_SHARD_CACHE environment variable): remote shards are
    downloaded there once and read from disk afterwards. ``start``: (byte offset, index) of the sample
    to begin with (an ``ImageRecord``'s ``end`` and ``index + 1`` continue after it): a local file is
    seeked into, a stream read up to there."""
    cache_dir = cache_dir or os.environ.get(remote.CACHE_ENV)
    location = str(shard.path)
    offset, first_index = start

    def fail(error: DataError, kind: str) -> None:
        if on_error == "raise":
            raise error
        stats.record(error, kind)

    def lose(error: DataError, kind: str, read: int = 0) -> None:
        stats.corrupt_shards += 1
        stats.lost_images += max(0, shard.images - read)
        fail(error, kind)

    if shard.is_remote and cache_dir:
        try:
            shard = dataclasses.replace(shard, path=remote.cached_copy(shard.path, shard.bytes, cache_dir))
        except (DataError, OSError, HTTPException) as error:
            lose(DataError(f"{shard.path}: not cached ({error}); its {shard.images} images are not read"), "shard_open")
            return
    if shard.is_remote:
        try:
            stream = remote.open_stream(shard.path)
        except DataError as error:
            lose(DataError(f"{error}; its {shard.images} images are not read"), "shard_open")
            return
    else:
        size = shard.size_on_disk
        if size != shard.bytes:
            lose(DataError(f"{shard.path}: {f'{size} bytes' if size is not None else 'no file'} on disk, the "
                           f"manifest says {shard.bytes} bytes (truncated, missing or replaced); its {shard.images} "
                           f"images are not read"), "shard_size")
            return
        stream = open(shard.path, "rb", buffering=1 << 20)  # noqa: SIM115 -- closed below
    seen = first_index
    key, members, sample_start, sample_end = None, {}, offset, offset
    try:
        _advance(stream, offset)
        for name, data, member_start, member_end in iter_tar_members(stream, offset):
            member_key, _, suffix = name.rpartition("/")[2].partition(".")
            if member_key != key:
                if key is not None:
                    record = _checked(key, members, shard, stats, fail, (location, seen, sample_start, member_start))
                    seen += 1
                    if record is not None:
                        yield record
                key, members, sample_start = member_key, {}, member_start
            members[suffix] = data
            sample_end = member_end
        remote.close(stream, str(shard.path))
    except (TarFormatError, OSError, HTTPException, remote.StreamError) as error:
        lose(DataError(f"{shard.path}: corrupt or truncated tar after {seen} of {shard.images} images "
                       f"({error}); sample {key!r} and any after it are lost"), "corrupt_shard", seen)
        return
    finally:  # also when the consumer stops early or a sample's error propagates
        with contextlib.suppress(Exception):
            stream.close()
    if key is not None:
        record = _checked(key, members, shard, stats, fail, (location, seen, sample_start, sample_end))
        seen += 1
        if record is not None:
            yield record
    if seen != shard.images:
        lose(DataError(f"{shard.path}: holds {seen} images, the manifest says {shard.images}"), "image_count", seen)


def _advance(stream, offset: int) -> None:
    """Move a fresh stream to byte ``offset``: a seek where it can, else read and discard up to there."""
    if not offset:
        return
    if getattr(stream, "seekable", lambda: False)():
        stream.seek(offset)
        return
    left = offset
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise OSError(f"the stream ends {offset - left} bytes in, before byte {offset}")
        left -= len(chunk)


def _checked(key, members, shard, stats, fail, where: tuple[str, int, int, int]) -> ImageRecord | None:
    try:
        record = _decode(key, members, shard)
    except DataError as error:
        stats.skipped_images += 1
        fail(error, "nonfinite" if isinstance(error, NonFiniteSample) else "bad_sample")
        return None
    stats.images += 1
    record.location, record.index, record.start, record.end = where
    return record


def read_images(refs: Iterable[ImageRef], shards: Sequence[Shard], cache_dir: str | Path | None = None
                ) -> dict[ImageRef, ImageRecord]:
    """Images read again where they were found (``ImageRecord.ref``): a seek per image in a local or
    cached shard, one pass from the first wanted image in a streamed one."""
    by_location: dict[str, set[ImageRef]] = {}
    for ref in refs:
        by_location.setdefault(ref[0], set()).add(ref)
    listed = {str(shard.path): shard for shard in shards}
    found: dict[ImageRef, ImageRecord] = {}
    for location, wanted in by_location.items():
        shard = listed.get(location)
        if shard is None:
            raise DataError(f"{location}: a saved data position refers to this shard, which the dataset no "
                            f"longer lists")
        ordered = sorted(wanted, key=lambda ref: ref[1])
        one_pass = shard.is_remote and not (cache_dir or os.environ.get(remote.CACHE_ENV))
        for ref in ordered[:1] if one_pass else ordered:
            with contextlib.closing(read_shard(shard, ReaderStats(), "raise", cache_dir, start=ref[1:])) as images:
                for image in images:
                    if image.ref in wanted:
                        found[image.ref] = image
                    if not one_pass or image.start >= ordered[-1][1]:
                        break
        missing = wanted - found.keys()
        if missing:
            raise DataError(f"{location}: no image at byte offset(s) {sorted(ref[1] for ref in missing)[:5]}, where "
                            f"a saved data position says one was read (the shard changed since?)")
    return found


def pairs_of(image: ImageRecord, tokenizer: TokenizerInfo, max_text_len: int | None,
             stats: ReaderStats) -> Iterator[Pair]:
    """One pair per caption; ``input_ids`` get [CLS]/[SEP]. Captions over ``max_text_len`` tokens
    (without CLS/SEP) are dropped and counted, as the reference dropped captions over 60 tokens."""
    for index in range(len(image.captions)):
        pair = pair_of(image, index, tokenizer, max_text_len, stats)
        if pair is not None:
            yield pair


def pair_of(image: ImageRecord, index: int, tokenizer: TokenizerInfo, max_text_len: int | None = None,
            stats: ReaderStats | None = None) -> Pair | None:
    """Caption ``index`` of ``image`` as a pair, or None (counted in ``stats``) when it is too long."""
    ids = image.captions[index]["input_ids"]
    if max_text_len is not None and len(ids) > max_text_len:
        if stats is not None:
            stats.dropped_long_captions += 1
        return None
    if stats is not None:
        stats.pairs += 1
    return Pair(image, index, np.array([tokenizer.cls_id, *ids, tokenizer.sep_id], dtype=np.int64))


class ShuffleBuffer:
    """Streaming shuffle: once ``size`` items are held, each new one takes the place of a random one,
    which leaves; at the end of the input the rest leave in random order. Its state (items, rng) is plain."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.items: list = []
        self.draining = False

    def add(self, item):
        """The item that leaves in exchange, or None while the buffer fills."""
        if self.size <= 1:
            return item
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        index = self.rng.randrange(self.size)
        out, self.items[index] = self.items[index], item
        return out

    def finish(self) -> None:
        self.rng.shuffle(self.items)
        self.draining = True

    def drain(self):
        """After ``finish``: the next item to leave, or None when empty."""
        return self.items.pop(0) if self.items else None


def shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle with a buffer: emit a random element once the buffer is full."""
    buffer = ShuffleBuffer(buffer_size, rng)
    for item in items:
        out = buffer.add(item)
        if out is not None:
            yield out
    buffer.finish()
    while (out := buffer.drain()) is not None:
        yield out
