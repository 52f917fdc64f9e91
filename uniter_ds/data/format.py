"""The shard format: a public contract, documented in docs/DATA.md.

One WebDataset sample per IMAGE with all of its captions (features are stored once, however many
captions an image has: Visual Genome averages 50 captions per image). Members of sample ``KEY``:

    KEY.feat.npy   float16 [N, img_dim]   region features
    KEY.pos.npy    float32 [N, 7]         x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)*(h/H)
    KEY.conf.npy   float16 [N]            detector confidence (optional)
    KEY.soft.npy   float16 [N, label_dim] detector class distribution, class 0 = background (optional)
    KEY.json       {"image_id", "captions": [{"id", "text", "input_ids"}], ...}
                   input_ids without [CLS]/[SEP]; the reader adds them

A dataset folder holds the shards and ``manifest.json`` (see :class:`Manifest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ARRAY_FIELDS = {"feat": np.float16, "pos": np.float32, "conf": np.float16, "soft": np.float16}
REQUIRED_MEMBERS = ("feat.npy", "pos.npy", "json")
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
# A shard name from a manifest becomes part of a local path, a URL and a ``pipe:`` shell command: only
# characters that mean nothing to a shell or a path, and no leading dot.
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@-]*\.tar")


class DataError(ValueError):
    """Bad input data; the message names the file and the sample."""


def sample_key(image_id: str) -> str:
    """A WebDataset key from an image id: no dots (a key ends at its first dot), no slashes."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", str(image_id))
    if not _KEY_OK.match(key):
        raise DataError(f"image id {image_id!r} gives no usable sample key")
    return key


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """Parse a .npy member without copying. Headers repeat exactly for arrays of the same dtype and
    shape, so each distinct header is parsed once (by numpy) and cached: numpy's own parser costs
    ~50 us per array, more than the rest of a sample's decoding."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy array (bad magic)")
    if data[6] == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    else:
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    header = bytes(data[start:start + header_len])
    cached = _npy_headers.get(header)
    if cached is None:
        probe = np.load(io.BytesIO(data), allow_pickle=False)
        if probe.dtype.hasobject or not probe.flags.c_contiguous:
            return probe
        cached = (probe.dtype, probe.shape, start + header_len, probe.size)
        if len(_npy_headers) < 4096:
            _npy_headers[header] = cached
    dtype, shape, offset, count = cached
    return np.frombuffer(data, dtype=dtype, offset=offset, count=count).reshape(shape)


def positions_from_norm_bb(norm_bb: np.ndarray) -> np.ndarray:
    """The reference's 6 stored numbers (x1, y1, x2, y2, w, h, all normalised) + the area."""
    norm_bb = np.asarray(norm_bb, dtype=np.float32)
    if norm_bb.ndim != 2 or norm_bb.shape[1] != 6:
        raise DataError(f"norm_bb must be [N, 6], got {norm_bb.shape}")
    return np.concatenate([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:6]], axis=1)


def positions_from_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Raw pixel boxes [N, 4] (x1, y1, x2, y2) of a W x H image -> the 7 position numbers."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"boxes must be [N, 4], got {boxes.shape}")
    if width <= 0 or height <= 0:
        raise DataError(f"image size must be positive, got {width} x {height}")
    x1, y1 = boxes[:, 0] / width, boxes[:, 1] / height
    w, h = (boxes[:, 2] - boxes[:, 0]) / width, (boxes[:, 3] - boxes[:, 1]) / height
    return positions_from_norm_bb(np.stack([x1, y1, x1 + w, y1 + h, w, h], axis=1))


@dataclass
class TokenizerInfo:
    """Which token ids the captions use; two datasets mix only if these agree."""

    name: str
    vocab_size: int
    vocab_sha256: str
    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    # Ids drawn for MLM's "random token" replacement: [start, end), the vocabulary's word range.
    random_range: tuple[int, int]
    # Whether text is lower-cased before WordPiece (bert-base-uncased) or not (-cased, as UNITER's);
    # None: not recorded (manifests before this field), then guessed from the name by the export.
    lowercase: bool | None = None

    def guess_lowercase(self) -> bool:
        if self.lowercase is not None:
            return self.lowercase
        return "uncased" in self.name.lower()

    def __post_init__(self) -> None:
        self.random_range = tuple(self.random_range)  # JSON gives a list
        start, end = self.random_range
        if not 0 <= start < end <= self.vocab_size:
            raise DataError(f"tokenizer random_range {self.random_range} is not within [0, {self.vocab_size})")

    @staticmethod
    def hash_vocab(path: str | Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def summarize(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    arr = np.asarray(values)
    edges = [0, 10, 20, 30, 36, 40, 50, 60, 80, 100, 128, 256, 512]
    hist, _ = np.histogram(arr, bins=edges + [max(edges[-1] + 1, int(arr.max()) + 1)])
    return {
        "count": int(arr.size), "min": int(arr.min()), "max": int(arr.max()), "mean": round(float(arr.mean()), 3),
        "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
        "histogram": {"edges": edges, "counts": hist.tolist()},
    }


@dataclass
class ShardInfo:
    name: str
    images: int
    pairs: int
    bytes: int


@dataclass
class Manifest:
    name: str
    img_dim: int
    img_pos_dim: int
    img_label_dim: int | None  # None: the shards carry no soft labels (MRC/MRC-kl impossible)
    tokenizer: TokenizerInfo
    shards: list[ShardInfo]
    regions: dict[str, Any] = field(default_factory=dict)  # summary of regions per image
    text_lengths: dict[str, Any] = field(default_factory=dict)  # summary of caption tokens (no CLS/SEP)
    source: dict[str, Any] = field(default_factory=dict)  # how the data was made (converter, options)
    format_version: int = FORMAT_VERSION

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def pairs(self) -> int:
        return sum(s.pairs for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["images"], out["pairs"] = self.images, self.pairs
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.exists():
            raise DataError(f"{folder}: no {MANIFEST_NAME}; is this a uniter-ds dataset folder "
                            f"(made by `uniter-ds data synth|convert`)? An interrupted write leaves none.")
        return cls.from_text(path.read_text(), str(path))

    @classmethod
    def from_text(cls, text: str, path: str) -> Manifest:
        """A manifest's JSON text; ``path`` (a file or URL) names it in errors."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: format_version {version!r}, this reader reads version {FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        try:
            raw["tokenizer"] = TokenizerInfo(**raw["tokenizer"])
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            manifest = cls(**raw)
        except (KeyError, TypeError) as error:
            raise DataError(f"{path}: malformed manifest ({error})") from error
        problems = manifest.problems()
        if problems:
            raise DataError(f"{path}: malformed manifest: " + "; ".join(problems[:5])
                            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return manifest

    def problems(self) -> list[str]:
        """What in this manifest a reader must not act on: a shard name that is not a plain file name (it
        becomes part of a path, a URL and a ``pipe:`` shell command), counts and dims of the wrong type."""
        found = []

        def count(where: str, value: Any, least: int = 0) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                found.append(f"{where}: {value!r}, expected an integer >= {least}")

        for where, value, least in [("img_dim", self.img_dim, 1), ("img_pos_dim", self.img_pos_dim, 1),
                                    ("tokenizer.vocab_size", self.tokenizer.vocab_size, 1)]:
            count(where, value, least)
        if self.img_label_dim is not None:
            count("img_label_dim", self.img_label_dim, 2)
        if not isinstance(self.shards, list):
            return found + [f"shards: expected a list, got {type(self.shards).__name__}"]
        seen = set()
        for i, shard in enumerate(self.shards):
            if not isinstance(shard.name, str) or not SHARD_NAME.fullmatch(shard.name):
                found.append(f"shards[{i}].name {shard.name!r}: expected a plain file name ending in .tar (letters, "
                             f"digits and . _ - + = , @; no path, no spaces or shell characters)")
            elif shard.name in seen:
                found.append(f"shards[{i}].name {shard.name!r}: listed twice")
            seen.add(shard.name)
            for name in ("images", "pairs", "bytes"):
                count(f"shards[{i}].{name}", getattr(shard, name))
        return found

    def save(self, folder: str | Path) -> None:
        """Write through a temporary file and rename: a reader never sees half a manifest."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)


def check_compatible(
    manifest: Manifest,
    *,
    source: str,
    img_dim: int | None = None,
    img_pos_dim: int | None = None,
    img_label_dim: int | None = None,
    vocab_size: int | None = None,
    tokenizer: TokenizerInfo | None = None,
    need_soft_labels: bool = False,
) -> None:
    """Refuse a dataset that does not fit the model or the other datasets, saying what differs."""
    problems = []
    if img_dim is not None and manifest.img_dim != img_dim:
        problems.append(f"img_dim: data has {manifest.img_dim}-d features, the model expects {img_dim}")
    if img_pos_dim is not None and manifest.img_pos_dim != img_pos_dim:
        problems.append(f"img_pos_dim: data has {manifest.img_pos_dim}, the model expects {img_pos_dim}")
    if need_soft_labels and manifest.img_label_dim is None:
        problems.append("img_label_dim: the data has no detector soft labels, which MRC / MRC-kl need")
    if (img_label_dim is not None and manifest.img_label_dim is not None
            and manifest.img_label_dim != img_label_dim):
        problems.append(f"img_label_dim: data has {manifest.img_label_dim} classes, the model expects {img_label_dim}")
    if vocab_size is not None and manifest.tokenizer.vocab_size > vocab_size:
        problems.append(f"vocab_size: the data's tokenizer has {manifest.tokenizer.vocab_size} ids, "
                        f"the model's embedding table {vocab_size}")
    if tokenizer is not None and tokenizer != manifest.tokenizer:
        diff = [f.name for f in dataclasses.fields(TokenizerInfo)
                if getattr(tokenizer, f.name) != getattr(manifest.tokenizer, f.name)]
        problems.append(f"tokenizer differs in {diff} (expected {tokenizer.name}, data has {manifest.tokenizer.name})")
    if problems:
        raise DataError(f"{source}: dataset does not match: " + "; ".join(problems))
