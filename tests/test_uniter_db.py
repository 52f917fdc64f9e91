"""The released UNITER databases (LMDB img_db plain and compressed, LMDB txt_db) convert to shards.

The fixture writes the databases as the authors' scripts did, from the format's description: image
values as msgpack maps of fp16 arrays in msgpack-numpy's encoding (written with msgpack-numpy itself) or
as ``np.savez_compressed`` bytes, cut to each image's box count, with ``__keys__`` and the nbb json;
text values as lz4-framed msgpack maps; ``meta.json`` with the released spellings (``CLS``, ``SEP``,
``MASK``, ``UNK``, ``v_range``, ``toker``). The shards are compared with the fixture's own arrays.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniter_ds.data import DataError, ReaderStats, read_shard, resolve_sources
from uniter_ds.data.convert import convert_uniter_db
from uniter_ds.data.uniter_db import FIXTURE_DB_NAME as DB_NAME
from uniter_ds.data.uniter_db import FIXTURE_META as META
from uniter_ds.data.uniter_db import ImageDb, TextDb, reference_nbb, write_img_db, write_txt_db

lmdb = pytest.importorskip("lmdb", reason="the [convert] extra is part of the [test] extra")
import msgpack  # noqa: E402
import msgpack_numpy  # noqa: E402


def _image(rng: np.random.Generator, n: int, confident: int, dim: int = 32, labels: int = 9) -> dict[str, np.ndarray]:
    conf = np.sort(np.concatenate([rng.uniform(0.21, 1, confident), rng.uniform(0, 0.19, n - confident)]))[::-1]
    return {"features": rng.random((n, dim)).astype(np.float32), "norm_bb": rng.random((n, 6)).astype(np.float32),
            "conf": conf.astype(np.float32), "soft_labels": rng.dirichlet(np.ones(labels), size=n).astype(np.float32)}


@pytest.fixture
def released(tmp_path):
    """COCO-like texts over two image databases, one plain and one compressed."""
    rng = np.random.default_rng(0)
    plain = {f"coco_train2014_{i:012d}.npz": _image(rng, n, c) for i, (n, c) in enumerate([(14, 3), (60, 45)])}
    packed = {f"vg_{i}.npz": _image(rng, n, c) for i, (n, c) in enumerate([(120, 110), (30, 20)])}
    stored = write_img_db(tmp_path / "img_db" / "coco_train2014", plain, compressed=False)
    stored |= write_img_db(tmp_path / "img_db" / "vg", packed, compressed=True)
    rows = {}
    for k, fname in enumerate([*plain, *packed, *plain]):
        rows[str(1000 + k)] = {"input_ids": rng.integers(106, 28996, int(rng.integers(4, 20))).tolist(),
                               "img_fname": fname, "raw": f"caption {k}", "toked_caption": ["x"]}
    write_txt_db(tmp_path / "txt_db" / "pretrain_train.db", rows)
    return tmp_path, stored, rows


def _read_all(folder: Path) -> dict:
    stats = ReaderStats()
    return {im.key: im for shard in resolve_sources([folder]) for im in read_shard(shard, stats)}


def test_released_databases_convert_and_equal_a_direct_read(released):
    root, stored, rows = released
    manifest, report = convert_uniter_db([root / "img_db" / "coco_train2014", root / "img_db" / "vg"],
                                         root / "txt_db" / "pretrain_train.db", root / "out")
    assert (report.images_written, report.pairs_written, report.captions_without_image) == (4, 6, 0)
    tok = manifest.tokenizer
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.random_range, tok.name) == (101, 102, 103, (106, 28996),
                                                                                 "bert-base-cased")
    assert not tok.lowercase and manifest.img_dim == 32 and manifest.img_label_dim == 9
    assert manifest.source["converter"] == "uniter-db"
    shards = _read_all(root / "out")
    assert len(shards) == 4
    for fname, dump in stored.items():
        image = next(im for im in shards.values() if im.image_id == Path(fname).stem)
        k = reference_nbb(dump["conf"].astype(np.float32))  # nothing beyond the stored count
        assert len(image.feat) == len(dump["features"]) == k
        assert np.array_equal(image.feat, dump["features"])
        bb = dump["norm_bb"].astype(np.float32)
        assert np.array_equal(image.pos, np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1))
        assert np.array_equal(image.soft, dump["soft_labels"])
        assert [c["input_ids"] for c in image.captions] == [r["input_ids"] for r in rows.values()
                                                            if r["img_fname"] == fname]
        assert [c["text"] for c in image.captions] == [r["raw"] for r in rows.values() if r["img_fname"] == fname]


def test_worker_processes_write_the_same_samples_and_report_the_same_problems(released):
    root, _, rows = released
    dbs = [root / "img_db" / "coco_train2014", root / "img_db" / "vg"]
    txt_db = root / "txt_db" / "pretrain_train.db"
    (txt_db / "txt2img.json").write_text(json.dumps({t: r["img_fname"] for t, r in rows.items()} | {"77": "gone.npz"}))
    (txt_db / "img2txts.json").unlink()  # grouped from txt2img.json instead
    one, report_one = convert_uniter_db(dbs, txt_db, root / "one", images_per_shard=2, on_error="skip")
    two, report_two = convert_uniter_db(dbs, txt_db, root / "two", images_per_shard=2, on_error="skip", workers=2)
    assert report_one == report_two and report_two.captions_without_image == 1 and report_two.images_written == 4
    assert one.to_dict() | {"source": None} == two.to_dict() | {"source": None}
    assert [s.images for s in two.shards] == [2, 2]  # the missing image's shard is one short of 3
    for shard in one.shards:  # each worker wrote whole shards: byte for byte what one process writes
        assert (root / "one" / shard.name).read_bytes() == (root / "two" / shard.name).read_bytes()
    assert not (root / "two" / ".convert-parts").exists()


def test_an_interrupted_conversion_continues_with_the_shards_it_lacks(released):
    root, _, rows = released
    dbs = [root / "img_db" / "coco_train2014", root / "img_db" / "vg"]
    txt_db = root / "txt_db" / "pretrain_train.db"
    listed = {"coco_train2014_000000000000.npz": ["1000"], "vg_0.npz": ["1002"], "vg_1.npz": ["1003"],
              "gone.npz": ["1001"], "coco_train2014_000000000001.npz": ["1004"]}
    (txt_db / "img2txts.json").write_text(json.dumps(listed))  # shard 2 (gone.npz, then ...0001) will fail
    whole, _ = convert_uniter_db(dbs, txt_db, root / "whole", images_per_shard=1, on_error="skip")
    out = root / "out"
    with pytest.raises(DataError, match="gone.npz"):
        convert_uniter_db(dbs, txt_db, out, images_per_shard=1)
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    stamps = {name: (out / name).stat().st_mtime_ns for name in finished}
    (out / "data-000004.tar.tmp").write_bytes(b"half a shard: the process was killed here")
    lines: list[str] = []
    manifest, report = convert_uniter_db(dbs, txt_db, out, images_per_shard=1, on_error="skip", log=lines.append)
    assert lines == [f"{out}: continuing an interrupted conversion, 3 of 5 shards already written "
                     f"(--restart starts over)"]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == stamps  # not written again
    assert manifest.to_dict() == whole.to_dict() | {"source": manifest.source}
    assert report.images_written == 4 and report.captions_without_image == 1
    assert not list(out.glob("*.tmp")) and not (out / ".convert-parts").exists()
    for shard in manifest.shards:
        assert (out / shard.name).read_bytes() == (root / "whole" / shard.name).read_bytes()
    assert [s.name for s in manifest.shards] == [f"data-00000{i}.tar" for i in (0, 1, 2, 4)]  # 3: gone.npz only

    with pytest.raises(DataError, match="gone.npz"):  # interrupted again: another plan starts over
        convert_uniter_db(dbs, txt_db, out, images_per_shard=2)
    assert not (out / "manifest.json").exists() and not (out / "data-000004.tar").exists()
    manifest, _ = convert_uniter_db(dbs, txt_db, out, images_per_shard=1, on_error="skip", restart=True,
                                    log=lines.append)
    assert len(lines) == 1 and manifest.images == 4


def test_the_command_line_converts_and_inspect_reads_the_result(released):
    root, _, _ = released
    convert = [sys.executable, "-m", "uniter_ds.cli", "data", "convert", "uniter-db", "--out", str(root / "out"),
               "--img-db", str(root / "img_db" / "coco_train2014"), "--img-db", str(root / "img_db" / "vg"),
               "--txt-db", str(root / "txt_db" / "pretrain_train.db"), "--shard-images", "3", "--workers", "2"]
    refused = subprocess.run([*convert, "--shard-mb", "1"], capture_output=True, text=True)
    assert refused.returncode != 0 and "--shard-images" in refused.stderr and not (root / "out").exists()
    done = subprocess.run(convert, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    inspect = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "data", "inspect", str(root / "out"), "--json"],
                             capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["pairs"] == 6


def test_the_lmdb_folder_itself_and_a_database_without_nbb_json(released):
    root, stored, _ = released
    fname = "coco_train2014_000000000001.npz"
    direct = ImageDb(root / "img_db" / "coco_train2014" / DB_NAME)
    assert np.array_equal(direct.read(fname)["features"], stored[fname]["features"].astype(np.float32))
    direct.close()
    (root / "img_db" / "coco_train2014" / "nbb_th0.2_max100_min10.json").unlink()
    recount = ImageDb(root / "img_db" / "coco_train2014")  # box count from conf, as the reference's fallback
    assert len(recount.read(fname)["features"]) == reference_nbb(stored[fname]["conf"].astype(np.float32))
    assert set(recount.names()) == {"coco_train2014_000000000000.npz", fname}


def test_meta_json_key_spellings(tmp_path):
    lower = {"cls": 2, "sep": 3, "mask": 4, "v_range": [5, 60], "bert": "bert-base-uncased"}
    write_txt_db(tmp_path / "lower.db", {"1": {"input_ids": [7], "img_fname": "a.npz"}}, meta=lower)
    tok = TextDb(tmp_path / "lower.db").tokenizer()
    assert (tok.cls_id, tok.random_range, tok.lowercase) == (2, (5, 60), True)
    missing = {k: v for k, v in META.items() if k != "MASK"}
    write_txt_db(tmp_path / "missing.db", {"1": {"input_ids": [7], "img_fname": "a.npz"}}, meta=missing)
    with pytest.raises(DataError, match=r"missing.db/meta.json: missing 'MASK'"):
        TextDb(tmp_path / "missing.db").tokenizer()


def test_bad_image_values_are_named_or_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    images = {f"img_{i}.npz": _image(rng, 20, 15) for i in range(3)}
    no_bb = msgpack.dumps({"features": images["img_0.npz"]["features"][:15].astype(np.float16)},
                          default=msgpack_numpy.encode, use_bin_type=True)
    write_img_db(tmp_path / "img_db" / "x", images, compressed=False, values={"img_0.npz": no_bb})
    rows = {str(i): {"input_ids": [200 + i], "img_fname": f"img_{i}.npz"} for i in range(3)}
    rows["9"] = {"input_ids": [300], "img_fname": "not_there.npz"}
    write_txt_db(tmp_path / "txt_db" / "t.db", rows)
    args = ([tmp_path / "img_db" / "x"], tmp_path / "txt_db" / "t.db")
    with pytest.raises(DataError, match=r"x/feat_th0.2_max100_min10\[img_0.npz\]: missing \['norm_bb'\]"):
        convert_uniter_db(*args, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest, report = convert_uniter_db(*args, tmp_path / "out", on_error="skip")
    assert manifest.images == 2 and report.skipped_images == 1 and report.captions_without_image == 1
    assert any("not_there.npz" in p for p in report.problems) and any("img_0.npz" in p for p in report.problems)

    del rows["9"]
    write_txt_db(tmp_path / "txt_db" / "t2.db", rows)
    wrong = msgpack.dumps({"features": np.zeros((15, 32), np.float16), "norm_bb": np.zeros((15, 4), np.float16)},
                          default=msgpack_numpy.encode, use_bin_type=True)
    write_img_db(tmp_path / "img_db" / "y", images, compressed=False, values={"img_0.npz": wrong})
    with pytest.raises(DataError, match=r"img_0.npz\]: features \(15, 32\) and norm_bb \(15, 4\): expected"):
        convert_uniter_db([tmp_path / "img_db" / "y"], tmp_path / "txt_db" / "t2.db", tmp_path / "out2")


def test_a_text_pointing_at_a_missing_image_is_named(tmp_path):
    rng = np.random.default_rng(2)
    write_img_db(tmp_path / "img_db" / "x", {"a.npz": _image(rng, 12, 12)}, compressed=True)
    write_txt_db(tmp_path / "t.db", {"1": {"input_ids": [200], "img_fname": "a.npz"},
                                     "2": {"input_ids": [201], "img_fname": "b.npz"}})
    with pytest.raises(DataError, match=r"image 'b.npz' of .*t.db: in none of the image databases"):
        convert_uniter_db([tmp_path / "img_db" / "x"], tmp_path / "t.db", tmp_path / "out")


def test_the_vocabulary_travels_with_the_shards_and_a_stale_one_does_not(released):
    from uniter_ds.data.format import TokenizerInfo

    root, _, _ = released
    dbs = [root / "img_db" / "coco_train2014", root / "img_db" / "vg"]
    txt_db = root / "txt_db" / "pretrain_train.db"
    vocab = root / "vocab.txt"
    vocab.write_text("".join(f"[unused{i}]\n" for i in range(28996)))
    manifest, _ = convert_uniter_db(dbs, txt_db, root / "out", vocab_file=vocab)
    assert (root / "out" / "vocab.txt").read_bytes() == vocab.read_bytes()  # what the export builds the tokenizer from
    assert manifest.tokenizer.vocab_sha256 == TokenizerInfo.hash_vocab(vocab) and manifest.tokenizer.vocab_size == 28996
    manifest, _ = convert_uniter_db(dbs, txt_db, root / "out")  # the same folder, no vocabulary this time
    assert not (root / "out" / "vocab.txt").exists() and manifest.tokenizer.vocab_sha256 == "unknown"
