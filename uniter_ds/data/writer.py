"""Streaming dataset writer: shards sized by bytes, each written under a temporary name and renamed
when complete, the manifest written last. An interrupted write leaves no shard that looks complete
and no manifest, so nothing reads a half-made dataset."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .format import (
    ARRAY_FIELDS,
    MANIFEST_NAME,
    DataError,
    Manifest,
    ShardInfo,
    TokenizerInfo,
    npy_bytes,
    sample_key,
    summarize,
)


class DatasetWriter:
    def __init__(
        self,
        folder: str | Path,
        *,
        name: str,
        img_dim: int | None,
        img_label_dim: int | None | str,
        tokenizer: TokenizerInfo,
        max_shard_bytes: int = 512 * 2**20,
        img_pos_dim: int = 7,
        source: dict[str, Any] | None = None,
        overwrite: bool = False,
        clear: bool = True,
    ):
        self.folder = Path(folder)
        if clear:
            if (self.folder / MANIFEST_NAME).exists() and not overwrite:
                raise FileExistsError(f"{self.folder} already holds a dataset ({MANIFEST_NAME}); pass overwrite")
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in [*self.folder.glob("*.tar"), *self.folder.glob("*.tar.tmp"), self.folder / MANIFEST_NAME]:
                stale.unlink(missing_ok=True)
        # img_dim None / img_label_dim "auto": taken from the first sample (converters learn them there).
        self.name, self.img_dim, self.img_label_dim = name, img_dim, img_label_dim
        self.img_pos_dim, self.tokenizer, self.source = img_pos_dim, tokenizer, source or {}
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._shard = ShardInfo("", 0, 0, 0)
        self._keys: set[str] = set()
        self._region_counts: list[int] = []
        self._text_lengths: list[int] = []
        self.manifest: Manifest | None = None  # set by close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(
        self,
        image_id: str,
        feat: np.ndarray,
        pos: np.ndarray,
        captions: Sequence[dict[str, Any]],
        *,
        conf: np.ndarray | None = None,
        soft: np.ndarray | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """One image with its captions; each caption is ``{"id", "text", "input_ids"}`` (no CLS/SEP)."""
        key = sample_key(image_id)
        where = f"image {image_id!r}"
        if self.img_dim is None and np.ndim(feat) == 2:
            self.img_dim = int(np.shape(feat)[1])
        if self.img_label_dim == "auto":
            self.img_label_dim = int(np.shape(soft)[1]) if soft is not None else None
        if key in self._keys:
            raise DataError(f"{where}: duplicate sample key {key!r}")
        arrays = {"feat": feat, "pos": pos, "conf": conf, "soft": soft}
        expected = {"feat": (self.img_dim,), "pos": (self.img_pos_dim,), "conf": (), "soft": (self.img_label_dim,)}
        num_regions = np.shape(feat)[0] if np.ndim(feat) == 2 else -1
        if num_regions < 1:
            raise DataError(f"{where}: feat must be [N >= 1, {self.img_dim}], got shape {np.shape(feat)}")
        if soft is not None and self.img_label_dim is None:
            raise DataError(f"{where}: soft labels given to a dataset declared without them")
        members: dict[str, bytes] = {}
        for field_name, array in arrays.items():
            if array is None:
                continue
            array = np.asarray(array)
            if array.shape != (num_regions, *expected[field_name]):
                raise DataError(f"{where}: {field_name} must have shape {(num_regions, *expected[field_name])}, "
                                f"got {array.shape}")
            if not np.isfinite(array.astype(np.float32)).all():
                raise DataError(f"{where}: {field_name} contains NaN or inf")
            members[f"{field_name}.npy"] = npy_bytes(array.astype(ARRAY_FIELDS[field_name]))
        if self.img_label_dim is not None and soft is None:
            raise DataError(f"{where}: this dataset stores soft labels, none given")
        if not captions:
            raise DataError(f"{where}: no captions")
        clean_captions = []
        for i, caption in enumerate(captions):
            ids = [int(t) for t in caption["input_ids"]]
            if not ids:
                raise DataError(f"{where}: caption {i} ({caption.get('id')!r}) has no tokens")
            bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise DataError(f"{where}: caption {i} has token ids outside the vocabulary: {bad[:5]}")
            clean_captions.append({"id": str(caption.get("id", f"{key}_{i}")), "text": caption.get("text", ""),
                                   "input_ids": ids})
            self._text_lengths.append(len(ids))
        meta = {"image_id": str(image_id), "captions": clean_captions, **(extra or {})}
        members["json"] = json.dumps(meta, separators=(",", ":")).encode()

        self._write_sample(key, members, len(clean_captions))
        self._keys.add(key)
        self._region_counts.append(num_regions)

    def _write_sample(self, key: str, members: dict[str, bytes], num_pairs: int) -> None:
        if self._tar is None:
            self._shard = ShardInfo(self._shard_name(len(self.shards)), 0, 0, 0)
            self._tmp_path = self.folder / (self._shard.name + ".tmp")
            self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans calls)
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._shard.images += 1
        self._shard.pairs += num_pairs
        if self._tar.fileobj.tell() >= self.max_shard_bytes:
            self._finish_shard()

    def _shard_name(self, index: int) -> str:
        return f"{self.name}-{index:06d}.tar"

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        final = self.folder / self._shard.name
        self._shard.bytes = self._tmp_path.stat().st_size
        self._tmp_path.replace(final)
        self.shards.append(self._shard)
        self._tar, self._tmp_path = None, None

    def close(self) -> Manifest:
        if self._tar is not None:
            self._finish_shard()
        if not self.shards:
            raise DataError(f"{self.folder}: no samples were written")
        manifest = Manifest(
            name=self.name, img_dim=self.img_dim, img_pos_dim=self.img_pos_dim, img_label_dim=self.img_label_dim,
            tokenizer=self.tokenizer, shards=self.shards, regions=summarize(self._region_counts),
            text_lengths=summarize(self._text_lengths), source=self.source,
        )
        manifest.save(self.folder)
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        """Drop the shard in progress; completed shards stay, but without a manifest nothing reads them."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp_path is not None
            self._tmp_path.unlink(missing_ok=True)
            self._tar, self._tmp_path = None, None


class PartWriter(DatasetWriter):
    """One shard, ``{name}-{index:06d}.tar``, of a dataset that several processes write at once, a part
    each: nothing in the folder is cleared, and ``close`` returns the part's record (its shard and the
    per-image counts the manifest summarises) instead of writing a manifest; ``manifest_from_parts``
    joins the records. Same checks and bytes per sample as :class:`DatasetWriter`."""

    def __init__(self, folder: str | Path, index: int, **options: Any):
        super().__init__(folder, clear=False, max_shard_bytes=2**62, **options)
        self.index = index

    def _shard_name(self, index: int) -> str:
        return f"{self.name}-{self.index:06d}.tar"

    def close(self) -> dict[str, Any]:  # type: ignore[override]
        if self._tar is not None:
            self._finish_shard()
        shard = dataclasses.asdict(self.shards[0]) if self.shards else None
        return {"index": self.index, "shard": shard, "img_dim": self.img_dim, "img_label_dim": self.img_label_dim,
                "regions": self._region_counts, "text_lengths": self._text_lengths}


def manifest_from_parts(folder: str | Path, parts: Sequence[dict[str, Any]], *, name: str, img_pos_dim: int = 7,
                        tokenizer: TokenizerInfo, source: dict[str, Any]) -> Manifest:
    """The manifest of a dataset written as parts (in the parts' order; a part that wrote nothing has no
    shard), saved last, as :meth:`DatasetWriter.close` saves it."""
    written = [p for p in sorted(parts, key=lambda p: p["index"]) if p["shard"] is not None]
    if not written:
        raise DataError(f"{folder}: no samples were written")
    dims = {(p["img_dim"], p["img_label_dim"]) for p in written}
    if len(dims) > 1:
        raise DataError(f"{folder}: the parts disagree on (feature dim, soft label dim): {sorted(dims, key=str)}")
    (img_dim, img_label_dim), = dims
    manifest = Manifest(
        name=name, img_dim=img_dim, img_pos_dim=img_pos_dim, img_label_dim=img_label_dim, tokenizer=tokenizer,
        shards=[ShardInfo(**p["shard"]) for p in written],
        regions=summarize([n for p in written for n in p["regions"]]),
        text_lengths=summarize([n for p in written for n in p["text_lengths"]]), source=source)
    manifest.save(folder)
    return manifest
