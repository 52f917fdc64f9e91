"""The UNITER authors' released databases, read directly.

Image databases (``img_db/<name>/``): an LMDB folder ``feat_th{conf}_max{max}_min{min}`` (or
``feat_numbb{n}``, or ``all`` when every box was kept), with ``_compressed`` appended when the values are
npz archives, beside ``nbb_th{conf}_max{max}_min{min}.json`` (each image's box count). Key: the image file
name (``coco_train2014_000000000009.npz``); ``__keys__``: a JSON list of them. Value: a msgpack map of
arrays in msgpack-numpy's encoding (float16, already cut to the image's box count), or the bytes of an
``np.savez_compressed`` archive: ``features`` [n, 2048], ``norm_bb`` [n, 6] (x1, y1, x2, y2, w, h,
normalised), ``conf`` [n], ``soft_labels`` [n, 1601].

Text databases (``txt_db/<name>.db/``): an LMDB folder whose values are lz4-framed msgpack maps
(``input_ids`` without CLS/SEP, ``img_fname``, ``raw``, ...) keyed by text id, beside ``meta.json``
(``CLS``, ``SEP``, ``MASK``, ``UNK``, ``v_range``, ``toker``/``tokenizer``/``bert``), ``id2len.json``,
``txt2img.json`` and ``img2txts.json``.

Reading needs ``pip install 'uniter-ds[convert]'`` (lmdb, lz4, msgpack); msgpack-numpy's array encoding
is decoded here, so that package is not needed.
"""

from __future__ import annotations

import functools
import io
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .format import DataError, TokenizerInfo

IMAGE_ARRAYS = ("features", "norm_bb", "conf", "soft_labels")
_NPZ_MAGIC = b"PK\x03\x04"


def _modules() -> tuple[Any, Any, Any]:
    try:
        import lmdb
        import lz4.frame
        import msgpack
    except ImportError as error:
        raise DataError("reading the UNITER LMDB databases needs lmdb, lz4 and msgpack "
                        "(pip install 'uniter-ds[convert]')") from error
    return lmdb, lz4.frame, msgpack


def _field(obj: dict, name: str) -> Any:
    """msgpack-numpy wrote its field names as bytes; msgpack with ``raw=False`` keeps them bytes."""
    return obj[name.encode()] if name.encode() in obj else obj[name]


def decode_msgpack_numpy(obj: dict) -> Any:
    """``object_hook`` for msgpack-numpy's encoding: ``{nd: True, type, shape, data}`` is an array,
    ``{nc: True, type, data}`` a numpy scalar; any other map is returned unchanged."""
    if obj.get(b"nd", obj.get("nd")) is True:
        dtype = _field(obj, "type")
        if isinstance(dtype, list | tuple):  # structured dtype as a descr list
            dtype = [tuple(item) for item in dtype]
        return np.frombuffer(_field(obj, "data"), dtype=np.dtype(dtype)).reshape(_field(obj, "shape"))
    if obj.get(b"nc", obj.get("nc")) is True:
        return np.frombuffer(_field(obj, "data"), dtype=np.dtype(_field(obj, "type")))[0]
    return obj


def _open(folder: Path) -> Any:
    lmdb, _, _ = _modules()
    if not (folder / "data.mdb").exists():
        raise DataError(f"{folder}: not an LMDB database (no data.mdb)")
    return lmdb.open(str(folder), readonly=True, lock=False, readahead=False, max_readers=512)


def _get(env: Any, key: str, missing: str) -> bytes:
    with env.begin() as txn:
        value = txn.get(key.encode())
        if value is None:
            raise DataError(missing)
        return bytes(value)


class ImageDb:
    """One released image database. ``folder``: the ``img_db/<name>`` directory (the LMDB subfolder is
    found from ``conf_th``/``min_regions``/``max_regions``) or the LMDB folder itself."""

    def __init__(self, folder: str | Path, *, conf_th: float = 0.2, min_regions: int = 10, max_regions: int = 100):
        folder = Path(folder)
        self.conf_th, self.min_regions, self.max_regions = conf_th, min_regions, max_regions
        if (folder / "data.mdb").exists():
            self.lmdb_dir, parent = folder, folder.parent
        else:
            names = [f"feat_th{conf_th}_max{max_regions}_min{min_regions}", "all"]
            candidates = [folder / f"{n}{suffix}" for n in names for suffix in ("", "_compressed")]
            found = [c for c in candidates if (c / "data.mdb").exists()]
            found += sorted(p.parent for p in folder.glob("feat_numbb*/data.mdb"))
            if not found:
                raise DataError(f"{folder}: no image database in it (looked for {names[0]}[_compressed], "
                                f"all[_compressed], feat_numbb*: LMDB folders with a data.mdb)")
            self.lmdb_dir, parent = found[0], folder
        nbb_file = parent / f"nbb_th{conf_th}_max{max_regions}_min{min_regions}.json"
        self.name2nbb: dict[str, int] | None = json.loads(nbb_file.read_text()) if nbb_file.exists() else None
        self.env = _open(self.lmdb_dir)
        self.where = str(self.lmdb_dir)

    def names(self) -> list[str]:
        with self.env.begin() as txn:
            keys = txn.get(b"__keys__")
        if keys is not None:
            return json.loads(bytes(keys).decode())
        if self.name2nbb is not None:
            return list(self.name2nbb)
        raise DataError(f"{self.where}: no __keys__ entry and no nbb json beside it: cannot list the images")

    def __contains__(self, name: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(name.encode()) is not None

    def read(self, name: str) -> dict[str, np.ndarray]:
        """The image's arrays as float32 (conf, soft labels included where stored), cut to its box count
        as the reference cuts them (the nbb json, else confidence > conf_th clipped to [min, max])."""
        found = self.get(name)
        if found is None:
            raise DataError(f"{self.where}[{name}]: no such image in the database")
        return found

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        """:meth:`read`, or None when the database does not hold the image (one lookup)."""
        with self.env.begin() as txn:
            value = txn.get(name.encode())
            if value is None:
                return None
            value = bytes(value)
        where = f"{self.where}[{name}]"
        if value[:4] == _NPZ_MAGIC:
            with np.load(io.BytesIO(value), allow_pickle=False) as npz:
                dump = {key: npz[key] for key in npz.files}
        else:
            _, _, msgpack = _modules()
            try:
                dump = msgpack.loads(value, raw=False, object_hook=decode_msgpack_numpy)
            except Exception as error:
                raise DataError(f"{where}: not a msgpack map of arrays nor an npz archive ({error})") from error
            if not isinstance(dump, dict):
                raise DataError(f"{where}: expected a map of arrays, got {type(dump).__name__}")
        missing = [key for key in ("features", "norm_bb") if key not in dump]
        if missing:
            raise DataError(f"{where}: missing {missing} (has {sorted(dump)})")
        arrays = {key: np.asarray(dump[key]).astype(np.float32) for key in IMAGE_ARRAYS if key in dump}
        count = len(arrays["features"])
        if arrays["features"].ndim != 2 or arrays["norm_bb"].shape != (count, 6):
            raise DataError(f"{where}: features {arrays['features'].shape} and norm_bb {arrays['norm_bb'].shape}: "
                            f"expected [n, D] and [n, 6]")
        for key in ("conf", "soft_labels"):
            if key in arrays and len(arrays[key]) != count:
                raise DataError(f"{where}: {key} has {len(arrays[key])} rows for {count} boxes")
        if self.name2nbb is not None:
            if name not in self.name2nbb:
                raise DataError(f"{where}: not in the nbb json beside the database")
            keep = int(self.name2nbb[name])
            if keep > count:
                raise DataError(f"{where}: the nbb json says {keep} boxes, the database holds {count}")
        elif "conf" in arrays:
            keep = min(self.max_regions, max(self.min_regions, int((arrays["conf"] > self.conf_th).sum())))
        else:
            keep = count
        return {key: value[:keep] for key, value in arrays.items()}

    def close(self) -> None:
        self.env.close()


def tokenizer_from_meta(meta_file: Path, vocab_file: Path | None = None) -> TokenizerInfo:
    """TokenizerInfo from a text database's ``meta.json``, with the spellings the released databases
    use (``CLS``, ``SEP``, ``MASK``, ``v_range``, ``toker``/``tokenizer``/``bert``) or lower-case ones."""
    meta = json.loads(Path(meta_file).read_text())

    def get(name: str) -> Any:
        for key in (name, name.lower()):
            if key in meta:
                return meta[key]
        raise DataError(f"{meta_file}: missing {name!r} (keys: {sorted(meta)})")

    cls_id, sep_id, mask_id, v_range = get("CLS"), get("SEP"), get("MASK"), get("v_range")
    name = next((str(meta[k]) for k in ("toker", "tokenizer", "bert") if k in meta), "unknown")
    if vocab_file is not None:
        digest = TokenizerInfo.hash_vocab(vocab_file)
        size = len(Path(vocab_file).read_text().splitlines())
    else:
        digest, size = "unknown", int(v_range[1])
    return TokenizerInfo(name=name, vocab_size=size, vocab_sha256=digest, cls_id=int(cls_id), sep_id=int(sep_id),
                         mask_id=int(mask_id), pad_id=int(meta.get("PAD", meta.get("pad", 0))),
                         random_range=(int(v_range[0]), int(v_range[1])), lowercase="uncased" in name.lower())


class TextDb:
    """One released text database (``txt_db/<name>.db``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for required in ("meta.json", "txt2img.json"):
            if not (self.folder / required).exists():
                raise DataError(f"{self.folder}: no {required} (a UNITER text database has meta.json, id2len.json, "
                                f"txt2img.json and img2txts.json beside its data.mdb)")
        self.env = _open(self.folder)

    @functools.cached_property
    def txt2img(self) -> dict[str, Any]:
        """Loaded when asked for: a conversion worker reads texts by id and never needs it (VG: 5M ids)."""
        return json.loads((self.folder / "txt2img.json").read_text())

    def tokenizer(self, vocab_file: Path | None = None) -> TokenizerInfo:
        return tokenizer_from_meta(self.folder / "meta.json", vocab_file)

    def texts_by_image(self) -> tuple[dict[str, list[str]], list[str]]:
        """Image file name -> text ids (img2txts.json where present, else from txt2img.json), and the ids
        of texts that name several images (NLVR2-style), which pretraining pairs cannot hold."""
        by_image: dict[str, list[str]] = defaultdict(list)
        several = []
        for text_id, image in self.txt2img.items():
            if isinstance(image, str):
                by_image[image].append(text_id)
            else:
                several.append(text_id)
        img2txts = self.folder / "img2txts.json"
        if img2txts.exists():
            listed = json.loads(img2txts.read_text())
            by_image = defaultdict(list, {image: [t for t in ids if isinstance(self.txt2img.get(t), str)]
                                          for image, ids in listed.items()})
        return by_image, several

    def read(self, text_id: str) -> dict[str, Any]:
        _, lz4_frame, msgpack = _modules()
        where = f"{self.folder}[{text_id}]"
        value = _get(self.env, text_id, f"{where}: listed in txt2img.json but not in the database")
        try:
            row = msgpack.loads(lz4_frame.decompress(value), raw=False)
        except Exception as error:
            raise DataError(f"{where}: not an lz4-framed msgpack map ({error})") from error
        if not isinstance(row, dict) or "input_ids" not in row:
            raise DataError(f"{where}: expected a map with 'input_ids', got "
                            f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        return row

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for text_id in self.txt2img:
            yield text_id, self.read(text_id)

    def close(self) -> None:
        self.env.close()


class MissingImage(DataError):
    """A text names an image that none of the image databases holds."""


class ReleasedDatabases:
    """One text database and the image databases its texts point into, opened together: what one
    conversion process (or worker) reads from."""

    def __init__(self, img_dbs: list[Path], txt_db: Path, *, conf_th: float, min_regions: int, max_regions: int):
        self.texts = TextDb(txt_db)
        self.images: list[ImageDb] = []
        try:
            for folder in img_dbs:
                self.images.append(ImageDb(folder, conf_th=conf_th, min_regions=min_regions, max_regions=max_regions))
        except BaseException:
            self.close()
            raise
        self.txt_db = txt_db

    def sample(self, file_name: str, text_ids: list[str], with_soft_labels: bool) -> dict[str, Any]:
        """One image with its texts, as ``DatasetWriter.add`` takes it."""
        from .format import positions_from_norm_bb

        for holder in self.images:
            dump = holder.get(file_name)
            if dump is not None:
                break
        else:
            raise MissingImage(f"image {file_name!r} of {self.txt_db}: in none of the image databases "
                               f"{[db.where for db in self.images]}")
        if with_soft_labels and "soft_labels" not in dump:
            raise DataError(f"{holder.where}[{file_name}]: no soft_labels (convert with --no-soft-labels to go "
                            f"without)")
        captions = []
        for text_id in text_ids:
            row = self.texts.read(text_id)
            captions.append({"id": str(text_id), "text": row.get("raw", ""),
                             "input_ids": [int(t) for t in row["input_ids"]]})
        return {"image_id": Path(file_name).stem, "feat": dump["features"],
                "pos": positions_from_norm_bb(dump["norm_bb"]), "captions": captions, "conf": dump.get("conf"),
                "soft": dump.get("soft_labels") if with_soft_labels else None}

    def close(self) -> None:
        self.texts.close()
        for db in self.images:
            db.close()


# ---------------------------------------------------------------------------------------------
# Writing the released layout (the tests' and benchmarks' databases)
# ---------------------------------------------------------------------------------------------

FIXTURE_DB_NAME = "feat_th0.2_max100_min10"
FIXTURE_META = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [106, 28996], "toker": "bert-base-cased",
        "tokenizer": "bert-base-cased", "output": "/txt/pretrain_coco_train.db", "task": "pretrain"}


def reference_nbb(conf: np.ndarray) -> int:
    """The box count the authors kept: confidence over 0.2, between 10 and 100 boxes."""
    return int(min(100, max(10, int((conf > 0.2).sum()))))


def write_img_db(folder: Path, images: dict[str, dict[str, np.ndarray]], compressed: bool,
                 values: dict[str, bytes] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The released image database; returns what it stored (fp16, cut to the box count). ``values``: raw
    bytes to store instead for some keys (damaged records)."""
    import lmdb
    import msgpack
    import msgpack_numpy  # the encoder the UNITER authors' code used (the [test] extra)

    name = FIXTURE_DB_NAME + ("_compressed" if compressed else "")
    (folder / name).mkdir(parents=True)
    env = lmdb.open(str(folder / name), map_size=2**36)  # an upper bound, not an allocation
    stored, nbb = {}, {}
    with env.begin(write=True) as txn:
        for fname, arrays in images.items():
            nbb[fname] = reference_nbb(arrays["conf"])
            dump = {k: a.astype(np.float16)[: nbb[fname]] for k, a in arrays.items()}
            if compressed:
                with io.BytesIO() as buffer:
                    np.savez_compressed(buffer, **dump)
                    value = buffer.getvalue()
            else:
                value = msgpack.dumps(dump, default=msgpack_numpy.encode, use_bin_type=True)
            txn.put(fname.encode(), (values or {}).get(fname, value))
            stored[fname] = dump
        txn.put(b"__keys__", json.dumps(list(images)).encode())
    env.close()
    (folder / "nbb_th0.2_max100_min10.json").write_text(json.dumps(nbb))
    return stored


def write_txt_db(folder: Path, rows: dict[str, dict], meta: dict = FIXTURE_META) -> None:
    """The released text database of ``rows`` (text id -> its msgpack map)."""
    import lmdb
    import lz4.frame
    import msgpack

    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=2**24)
    with env.begin(write=True) as txn:
        for text_id, row in rows.items():
            txn.put(text_id.encode(), lz4.frame.compress(msgpack.dumps(row, use_bin_type=True)))
    env.close()
    img2txts: dict[str, list[str]] = {}
    for text_id, row in rows.items():
        img2txts.setdefault(row["img_fname"], []).append(text_id)
    (folder / "meta.json").write_text(json.dumps(meta, indent=4))
    (folder / "id2len.json").write_text(json.dumps({t: len(r["input_ids"]) for t, r in rows.items()}))
    (folder / "txt2img.json").write_text(json.dumps({t: r["img_fname"] for t, r in rows.items()}))
    (folder / "img2txts.json").write_text(json.dumps(img2txts))
