"""Converters from the layouts people already have into uniter-ds shards.

- ``original``: the UNITER reference's layout. Images: a folder of per-image ``.npz`` files with
  ``features`` (N x 2048), ``norm_bb`` (N x 6), ``conf`` (N) and ``soft_labels`` (N x 1601).
  Text: a JSON-lines table (``{"id", "img_fname", "input_ids", "raw"}``, ids without CLS/SEP) or the
  reference's LMDB ``txt_db`` folder (lz4-compressed msgpack values, ``meta.json`` with cls/sep/mask
  ids and ``v_range``; needs ``pip install uniter-ds[convert]``).
- ``tsv``: the bottom-up-attention TSV (``image_id, image_w, image_h, num_boxes, boxes, features``,
  base64 float32; optional ``cls_prob`` and ``objects_conf``) plus a JSON-lines captions file
  (``{"image_id", "caption"}``), tokenized with a Hugging Face tokenizer folder given by the user.

Region selection as the reference: keep the regions with confidence > ``conf_th``, at least
``min_regions`` and at most ``max_regions``, in the detector's order (which is by confidence).
Captions are held in memory (ids as int32 arrays); features stream one image at a time.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .format import MANIFEST_NAME, DataError, Manifest, TokenizerInfo, positions_from_boxes, positions_from_norm_bb
from .writer import DatasetWriter, PartWriter, manifest_from_parts


@dataclass
class ConversionReport:
    images_written: int = 0
    pairs_written: int = 0
    images_without_captions: int = 0
    captions_without_image: int = 0
    skipped_images: int = 0
    problems: list[str] = field(default_factory=list)

    def bad_input(self, error: Exception, where: str, on_error: str) -> None:
        """Raise the error (naming the input) or, with ``on_error='skip'``, count and record it."""
        located = error if where in str(error) else DataError(f"{where}: {error}")
        if on_error == "raise":
            raise located from (None if located is error else error)
        self.skipped_images += 1
        self.problems.append(str(located))


def select_regions(conf: np.ndarray | None, total: int, conf_th: float, min_regions: int, max_regions: int) -> int:
    """How many of the detector's (confidence-sorted) regions to keep."""
    if conf is None:
        return min(total, max_regions)
    keep = max(min_regions, int((np.asarray(conf) > conf_th).sum()))
    return min(keep, max_regions, total)


def _captions_by_image(rows: Iterator[tuple[str, dict]], image_field: str) -> dict[str, list[dict]]:
    by_image: dict[str, list[dict]] = defaultdict(list)
    for where, row in rows:
        if image_field not in row or "input_ids" not in row:
            raise DataError(f"{where}: text row needs {image_field!r} and 'input_ids', has {sorted(row)}")
        by_image[str(row[image_field])].append({
            "id": str(row.get("id", row.get("txt_id", ""))),
            "text": row.get("raw", row.get("caption", "")),
            "input_ids": np.asarray(row["input_ids"], dtype=np.int32),
        })
    return by_image


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{line_number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({error})") from error


def _lmdb_rows(folder: Path) -> Iterator[tuple[str, dict]]:
    try:
        import lmdb
        import lz4.frame
        import msgpack
    except ImportError as error:
        raise DataError(f"{folder}: reading an LMDB txt_db needs lmdb, lz4 and msgpack "
                        f"(pip install 'uniter-ds[convert]')") from error
    env = lmdb.open(str(folder), readonly=True, lock=False, readahead=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            row = msgpack.loads(lz4.frame.decompress(value), raw=False)
            row.setdefault("id", key.decode())
            yield f"{folder}[{key.decode()}]", row
    env.close()


def original_tokenizer_info(meta_file: Path, vocab_file: Path | None, vocab_size: int | None) -> TokenizerInfo:
    """From the reference's txt_db ``meta.json`` (``CLS``, ``SEP``, ``MASK``, ``v_range``, ``toker``; the
    released databases spell the ids in upper case, lower case is accepted too)."""
    from .uniter_db import tokenizer_from_meta

    info = tokenizer_from_meta(meta_file, vocab_file)
    if vocab_file is None and vocab_size:
        info.vocab_size = vocab_size
    return info


def convert_original(
    img_dir: str | Path,
    txt: str | Path,
    out: str | Path,
    *,
    tokenizer: TokenizerInfo | None = None,
    vocab_file: str | Path | None = None,
    conf_th: float = 0.2,
    min_regions: int = 10,
    max_regions: int = 100,
    with_soft_labels: bool = True,
    max_shard_bytes: int = 512 * 2**20,
    name: str = "data",
    on_error: str = "raise",
) -> tuple[Manifest, ConversionReport]:
    img_dir, txt = Path(img_dir), Path(txt)
    if txt.is_dir():
        if tokenizer is None:
            tokenizer = original_tokenizer_info(txt / "meta.json", Path(vocab_file) if vocab_file else None, None)
        rows = _lmdb_rows(txt)
    else:
        if tokenizer is None:
            meta_file = txt.parent / "meta.json"
            if not meta_file.exists():
                raise DataError(f"{txt}: give the tokenizer (cls/sep/mask ids, v_range) or put a meta.json beside it")
            tokenizer = original_tokenizer_info(meta_file, Path(vocab_file) if vocab_file else None, None)
        rows = _jsonl(txt)
    captions = _captions_by_image(rows, "img_fname")
    report = ConversionReport()
    files = {p.name: p for p in sorted(img_dir.glob("*.npz"))}
    report.captions_without_image = sum(len(c) for f, c in captions.items() if f not in files and
                                        f + ".npz" not in files)
    source = {"converter": "original", "img_dir": str(img_dir), "txt": str(txt), "conf_th": conf_th,
              "regions": [min_regions, max_regions]}
    with DatasetWriter(out, name=name, img_dim=None, img_label_dim="auto" if with_soft_labels else None,
                       tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, overwrite=True, source=source) as writer:
        for file_name, path in files.items():
            image_captions = captions.get(file_name) or captions.get(path.stem)
            if not image_captions:
                report.images_without_captions += 1
                continue
            try:
                with np.load(path) as npz:
                    missing = [k for k in ("features", "norm_bb", "conf") if k not in npz]
                    if missing:
                        raise DataError(f"{path}: missing array(s) {missing}")
                    feat, norm_bb, conf = npz["features"], npz["norm_bb"], npz["conf"]
                    soft = npz["soft_labels"] if with_soft_labels and "soft_labels" in npz else None
                if with_soft_labels and soft is None:
                    raise DataError(f"{path}: no soft_labels (convert with with_soft_labels=False to go without)")
                keep = select_regions(conf, len(feat), conf_th, min_regions, max_regions)
                writer.add(path.stem, feat[:keep], positions_from_norm_bb(norm_bb[:keep]),
                           [c | {"input_ids": c["input_ids"].tolist()} for c in image_captions],
                           conf=conf[:keep], soft=soft[:keep] if soft is not None else None)
            except DataError as error:
                report.bad_input(error, str(path), on_error)
                continue
            report.images_written += 1
            report.pairs_written += len(image_captions)
        if not report.images_written:
            raise DataError(f"{img_dir}: no image with captions found (npz files: {len(files)})")
    hand_on_tokenizer(Path(out), vocab_file)
    return writer.manifest, report


def hand_on_tokenizer(out: Path, vocab_file: str | Path | None) -> None:
    """Keep the tokenizer's ``vocab.txt`` beside the shards (the export makes the trained model's
    tokenizer from it), and nothing an earlier conversion into this folder left: a stale vocabulary
    would be exported as this data's."""
    (out / "vocab.txt").unlink(missing_ok=True)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    if vocab_file is not None:
        shutil.copy(vocab_file, out / "vocab.txt")


PARTS_DIR = ".convert-parts"  # a conversion in progress: its plan and one record per finished shard


def convert_uniter_db(
    img_dbs: list[str | Path],
    txt_db: str | Path,
    out: str | Path,
    *,
    vocab_file: str | Path | None = None,
    conf_th: float = 0.2,
    min_regions: int = 10,
    max_regions: int = 100,
    with_soft_labels: bool = True,
    images_per_shard: int = 1000,
    name: str = "data",
    on_error: str = "raise",
    workers: int = 1,
    restart: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Manifest, ConversionReport]:
    """The released LMDB databases (one text database, the image databases its texts point into) ->
    shards: one sample per image with all its texts, regions cut as the reference cuts them.

    Shard ``k`` holds the images ``k * images_per_shard ...`` of the text database's image list, whoever
    writes it: ``workers`` spawned processes each open the databases and write whole shards themselves
    (memory is one sample per process, whatever the database's size), and the shards are the same
    whatever their number. A finished shard is recorded in ``OUT/.convert-parts``; running the same
    conversion again after an interruption writes only the shards that are missing (``restart`` starts
    over). The manifest is written last."""
    from tqdm import tqdm

    from .uniter_db import ReleasedDatabases

    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    out, txt_db = Path(out), Path(txt_db)
    img_dbs = list(dict.fromkeys(Path(d).resolve() for d in img_dbs))  # LMDB opens a database once per process
    options = {"conf_th": conf_th, "min_regions": min_regions, "max_regions": max_regions}
    databases = ReleasedDatabases(img_dbs, txt_db, **options)
    try:
        tokenizer = databases.texts.tokenizer(Path(vocab_file) if vocab_file else None)
        by_image, several = databases.texts.texts_by_image()
        items = list(by_image.items())
        dims = _probe_dims(databases, items, with_soft_labels)
    finally:
        databases.close()
    source = {"converter": "uniter-db", "img_dbs": [str(d) for d in img_dbs], "txt_db": str(txt_db),
              "conf_th": conf_th, "regions": [min_regions, max_regions], "tokenizer": tokenizer.name}
    parts = [items[i:i + images_per_shard] for i in range(0, len(items), images_per_shard)]
    plan = {"source": source, "with_soft_labels": with_soft_labels, "images_per_shard": images_per_shard,
            "name": name, "items": hashlib.sha256(json.dumps(items).encode()).hexdigest(),
            "databases": {str(f): [f.stat().st_size, f.stat().st_mtime_ns]
                          for folder in [*img_dbs, txt_db] for f in sorted(folder.glob("**/data.mdb"))}}
    records = _finished_parts(out, plan, restart)
    if records and log:
        log(f"{out}: continuing an interrupted conversion, {len(records)} of {len(parts)} shards already written "
            f"(--restart starts over)")
    if on_error == "raise":
        problem = next((p for r in records.values() for p in r["problems"]), None)
        if problem:
            raise DataError(f"{problem} (recorded by the interrupted run, which skipped it)")
    writer_options = {"name": name, "tokenizer": tokenizer, **dims}
    tasks = [(out, index, part, with_soft_labels, on_error, writer_options)
             for index, part in enumerate(parts) if index not in records]
    bar = tqdm(total=len(items), initial=sum(len(parts[i]) for i in records), unit="img", disable=not progress,
               desc="converting")
    in_process = workers <= 1 or len(tasks) <= 1
    if in_process:
        _open_databases(img_dbs, txt_db, options)
        finished = map(_convert_part, tasks)
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_open_databases,
                                                         initargs=(img_dbs, txt_db, options))
        finished = pool.imap_unordered(_convert_part, tasks)
    try:
        for record in finished:
            records[record["index"]] = record
            bar.update(len(parts[record["index"]]))
    finally:
        bar.close()
        if in_process:
            _close_databases()
        else:
            pool.terminate()  # after an error: stop the other parts at once (their shards stay unfinished)
            pool.join()
    report = ConversionReport(captions_without_image=len(several))
    if several:
        report.problems.append(f"{txt_db}: {len(several)} texts name several images (e.g. {several[0]!r}, "
                               f"NLVR2-style), not image-text pairs: left out")
    for index in sorted(records):
        record = records[index]
        for key in ("images_written", "pairs_written", "captions_without_image", "skipped_images"):
            setattr(report, key, getattr(report, key) + record[key])
        report.problems += record["problems"]
    if not report.images_written:
        raise DataError(f"{txt_db}: no image of its texts was found in {[str(d) for d in img_dbs]}")
    manifest = manifest_from_parts(out, list(records.values()), name=name, tokenizer=tokenizer, source=source)
    hand_on_tokenizer(out, vocab_file)
    shutil.rmtree(out / PARTS_DIR)
    return manifest, report


def _probe_dims(databases: Any, items: list[tuple[str, list[str]]], with_soft_labels: bool) -> dict[str, Any]:
    """Feature and soft-label widths from the first image that reads, so that every part writes the same."""
    for file_name, _ in items[:100]:
        for db in databases.images:
            try:
                dump = db.get(file_name)
            except DataError:
                break
            if dump is not None:
                labels = dump.get("soft_labels")
                return {"img_dim": int(dump["features"].shape[1]),
                        "img_label_dim": int(labels.shape[1]) if with_soft_labels and labels is not None else None}
    # None read: let the parts meet (and name, or skip) each image's problem themselves.
    return {"img_dim": None, "img_label_dim": "auto" if with_soft_labels else None}


def _finished_parts(out: Path, plan: dict[str, Any], restart: bool) -> dict[int, dict[str, Any]]:
    """The records of the shards an interrupted run of the same conversion finished (none with ``restart``
    or another plan). Everything else in ``out`` that looks like a dataset is removed: no stale shard, no
    manifest until this conversion writes its own."""
    state = out / PARTS_DIR
    records: dict[int, dict[str, Any]] = {}
    same = (not restart and (state / "plan.json").exists()
            and json.loads((state / "plan.json").read_text()) == json.loads(json.dumps(plan)))
    if same:
        for path in sorted(state.glob("part-*.json")):
            record = json.loads(path.read_text())
            shard = record["shard"]
            shard_file = out / shard["name"] if shard else None
            if shard_file is None or (shard_file.exists() and shard_file.stat().st_size == shard["bytes"]):
                records[record["index"]] = record
    else:
        shutil.rmtree(state, ignore_errors=True)
    keep = {r["shard"]["name"] for r in records.values() if r["shard"]}
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.tar"), *out.glob("*.tar.tmp"), out / MANIFEST_NAME]:
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    state.mkdir(exist_ok=True)
    _write_atomically(state / "plan.json", json.dumps(plan, indent=1))
    return records


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


_databases: Any = None  # this process's open databases (LMDB environments do not survive a fork or a pickle)


def _open_databases(img_dbs: list[Path], txt_db: Path, options: dict[str, Any]) -> None:
    global _databases
    from .uniter_db import ReleasedDatabases

    _databases = ReleasedDatabases(img_dbs, txt_db, **options)


def _close_databases() -> None:
    global _databases
    if _databases is not None:
        _databases.close()
    _databases = None


def _convert_part(task: tuple) -> dict[str, Any]:
    """Write one shard from this process's databases; record it in ``OUT/.convert-parts`` once complete."""
    from .uniter_db import MissingImage

    out, index, items, with_soft_labels, on_error, writer_options = task
    report = ConversionReport()
    writer = PartWriter(out, index, **writer_options)
    try:
        for file_name, text_ids in items:
            try:
                sample = _databases.sample(file_name, text_ids, with_soft_labels)
                writer.add(sample.pop("image_id"), sample.pop("feat"), sample.pop("pos"), sample.pop("captions"),
                           **sample)
            except MissingImage as error:
                report.captions_without_image += len(text_ids)
                if on_error == "raise":
                    raise
                report.problems.append(str(error))
                continue
            except DataError as error:
                report.bad_input(error, f"image {file_name!r} of {_databases.txt_db}", on_error)
                continue
            report.images_written += 1
            report.pairs_written += len(text_ids)
    except BaseException:
        writer.abort()
        raise
    record = writer.close() | dataclasses.asdict(report)
    _write_atomically(Path(out) / PARTS_DIR / f"part-{index:06d}.json", json.dumps(record))
    return record


def tokenizer_info_from_hf(folder: str | Path):
    """Load a Hugging Face tokenizer from a local folder; describe it as a :class:`TokenizerInfo`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    vocab = tok.get_vocab()
    # Random replacement draws from the word range: after the bracketed special/[unusedN] tokens that
    # open a BERT vocabulary (999 for bert-base-cased, as the reference's v_range).
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    start = 0
    for token, index in by_id[:2000]:
        if re.fullmatch(r"\[.*\]|<.*>", token):
            start = index + 1
    vocab_file = Path(folder) / "vocab.txt"
    digest = TokenizerInfo.hash_vocab(vocab_file) if vocab_file.exists() else \
        TokenizerInfo.hash_vocab(Path(folder) / "tokenizer.json")
    lowercase = tok("A", add_special_tokens=False)["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]
    info = TokenizerInfo(name=Path(folder).name, vocab_size=len(vocab), vocab_sha256=digest,
                         cls_id=tok.cls_token_id, sep_id=tok.sep_token_id, mask_id=tok.mask_token_id,
                         pad_id=tok.pad_token_id or 0, random_range=(start, len(vocab)), lowercase=lowercase)
    return tok, info


TSV_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


def _decode_b64(value: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        array = np.frombuffer(base64.b64decode(value), dtype=np.float32)
        return array.reshape(shape)
    except ValueError as error:
        raise DataError(f"{where}: cannot decode to float32 {shape} ({error})") from error


def convert_tsv(
    tsv: str | Path,
    captions_file: str | Path,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    fields: list[str] | None = None,
    conf_th: float = 0.2,
    min_regions: int = 10,
    max_regions: int = 100,
    max_shard_bytes: int = 512 * 2**20,
    name: str = "data",
    on_error: str = "raise",
) -> tuple[Manifest, ConversionReport]:
    """Bottom-up-attention TSV + captions JSON lines -> shards. ``fields``: the TSV's columns, by default
    the six standard ones; ``cls_prob`` (N x C, float32) and ``objects_conf`` (N) are used when present."""
    tsv, fields = Path(tsv), fields or TSV_FIELDS
    tok, tokenizer = tokenizer_info_from_hf(tokenizer_dir)
    rows = []
    for where, row in _jsonl(Path(captions_file)):
        if "image_id" not in row or "caption" not in row:
            raise DataError(f"{where}: captions need 'image_id' and 'caption', have {sorted(row)}")
        ids = tok(row["caption"], add_special_tokens=False)["input_ids"]
        rows.append((where, {"image_id": str(row["image_id"]), "id": str(row.get("id", where)),
                             "caption": row["caption"], "input_ids": ids}))
    captions = _captions_by_image(iter(rows), "image_id")
    report = ConversionReport()
    seen: set[str] = set()
    csv.field_size_limit(sys.maxsize)
    source = {"converter": "tsv", "tsv": str(tsv), "captions": str(captions_file), "tokenizer": str(tokenizer_dir),
              "conf_th": conf_th, "regions": [min_regions, max_regions]}
    with DatasetWriter(out, name=name, img_dim=None, img_label_dim="auto", tokenizer=tokenizer,
                       max_shard_bytes=max_shard_bytes, overwrite=True, source=source) as writer, \
            open(tsv, newline="") as f:
        for line_number, row in enumerate(csv.DictReader(f, delimiter="\t", fieldnames=fields), 1):
            where = f"{tsv}:{line_number}"
            try:
                image_id = str(row["image_id"])
                seen.add(image_id)
                image_captions = captions.get(image_id)
                if not image_captions:
                    report.images_without_captions += 1
                    continue
                n = int(row["num_boxes"])
                boxes = _decode_b64(row["boxes"], (n, 4), f"{where} boxes")
                feat = _decode_b64(row["features"], (n, -1), f"{where} features")
                conf = (_decode_b64(row["objects_conf"], (n,), f"{where} objects_conf")
                        if row.get("objects_conf") else None)
                soft = _decode_b64(row["cls_prob"], (n, -1), f"{where} cls_prob") if row.get("cls_prob") else None
                keep = select_regions(conf, n, conf_th, min_regions, max_regions)
                pos = positions_from_boxes(boxes[:keep], float(row["image_w"]), float(row["image_h"]))
                writer.add(image_id, feat[:keep], pos,
                           [c | {"input_ids": c["input_ids"].tolist()} for c in image_captions],
                           conf=conf[:keep] if conf is not None else None,
                           soft=soft[:keep] if soft is not None else None,
                           extra={"width": float(row["image_w"]), "height": float(row["image_h"])})
            except (DataError, KeyError, ValueError) as error:
                report.bad_input(error if isinstance(error, DataError) else DataError(f"bad row ({error!r})"),
                                 where, on_error)
                continue
            report.images_written += 1
            report.pairs_written += len(image_captions)
        report.captions_without_image = sum(len(c) for i, c in captions.items() if i not in seen)
        if not report.images_written:
            raise DataError(f"{tsv}: no image with captions found")
    hand_on_tokenizer(Path(out), None)
    tok.save_pretrained(str(Path(out) / "tokenizer"))  # the export hands it on (AutoTokenizer)
    return writer.manifest, report
