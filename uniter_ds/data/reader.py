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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import numpy as np

from . import sources as remote
from .format import ARRAY_FIELDS, REQUIRED_MEMBERS, DataError, Manifest, TokenizerInfo, load_npy
from .tario import TarFormatError, iter_tar_stream


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


def resolve_sources(sources: Sequence[str | Path]) -> list[Shard]:
    """Dataset folders (all their shards), shard globs or brace ranges, or the same as URLs and specs
    (sources.py) -> shards, with manifests.

    All sources must share the tokenizer and feature dims, since they end up in the same batches.
    """
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


def shards_for_worker(shards: list[Shard], *, mode: str, seed: int, epoch: int, global_worker: int,
                      num_global_workers: int) -> Iterator[Shard]:
    if mode == "exact":
        if len(shards) < num_global_workers:
            raise DataError(f"exact split needs at least as many shards ({len(shards)}) as ranks x loader workers "
                            f"({num_global_workers}); write smaller shards or use resampled mode")
        order = list(range(len(shards)))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        for i in order[global_worker::num_global_workers]:
            yield shards[i]
    elif mode == "resampled":
        rng = random.Random(f"{seed}-{epoch}-{global_worker}")
        while True:
            yield shards[rng.randrange(len(shards))]
    else:
        raise ValueError(f"split mode must be 'exact' or 'resampled', got {mode!r}")


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
               cache_dir: str | Path | None = None) -> Iterator[ImageRecord]:
    """The images of one shard, in order. Errors name the shard and the sample; with ``on_error='skip'``
    a bad sample is skipped and a corrupt or truncated shard ends early, each counted in ``stats``.
    ``cache_dir`` (default: the UNITER_DS_SHARD_CACHE environment variable): remote shards are
    downloaded there once and read from disk afterwards."""
    cache_dir = cache_dir or os.environ.get(remote.CACHE_ENV)

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
        size = shard.path.stat().st_size if shard.path.exists() else None
        if size != shard.bytes:
            lose(DataError(f"{shard.path}: {f'{size} bytes' if size is not None else 'no file'} on disk, the "
                           f"manifest says {shard.bytes} bytes (truncated, missing or replaced); its {shard.images} "
                           f"images are not read"), "shard_size")
            return
        stream = open(shard.path, "rb", buffering=1 << 20)  # noqa: SIM115 -- closed below
    seen = 0
    key, members = None, {}
    try:
        for name, data in iter_tar_stream(stream):
            member_key, _, suffix = name.rpartition("/")[2].partition(".")
            if member_key != key:
                if key is not None:
                    record = _checked(key, members, shard, stats, fail)
                    seen += 1
                    if record is not None:
                        yield record
                key, members = member_key, {}
            members[suffix] = data
        remote.close(stream, str(shard.path))
    except (TarFormatError, OSError, HTTPException, remote.StreamError) as error:
        lose(DataError(f"{shard.path}: corrupt or truncated tar after {seen} of {shard.images} images "
                       f"({error}); sample {key!r} and any after it are lost"), "corrupt_shard", seen)
        return
    finally:  # also when the consumer stops early or a sample's error propagates
        with contextlib.suppress(Exception):
            stream.close()
    if key is not None:
        record = _checked(key, members, shard, stats, fail)
        seen += 1
        if record is not None:
            yield record
    if seen != shard.images:
        lose(DataError(f"{shard.path}: holds {seen} images, the manifest says {shard.images}"), "image_count", seen)


def _checked(key, members, shard, stats, fail) -> ImageRecord | None:
    try:
        record = _decode(key, members, shard)
    except DataError as error:
        stats.skipped_images += 1
        fail(error, "nonfinite" if isinstance(error, NonFiniteSample) else "bad_sample")
        return None
    stats.images += 1
    return record


def pairs_of(image: ImageRecord, tokenizer: TokenizerInfo, max_text_len: int | None,
             stats: ReaderStats) -> Iterator[Pair]:
    """One pair per caption; ``input_ids`` get [CLS]/[SEP]. Captions over ``max_text_len`` tokens
    (without CLS/SEP) are dropped and counted, as the reference dropped captions over 60 tokens."""
    for index, caption in enumerate(image.captions):
        ids = caption["input_ids"]
        if max_text_len is not None and len(ids) > max_text_len:
            stats.dropped_long_captions += 1
            continue
        stats.pairs += 1
        yield Pair(image, index, np.array([tokenizer.cls_id, *ids, tokenizer.sep_id], dtype=np.int64))


def shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle with a buffer: emit a random element once the buffer is full."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer
