"""Converters: the original UNITER layout (npz + JSON lines or LMDB text) and the bottom-up-attention TSV."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from uniter_ds.data import DataError, ReaderStats, read_shard, resolve_sources
from uniter_ds.data.convert import convert_original, convert_tsv
from uniter_ds.data.synth import write_vocab

META = {"cls": 2, "sep": 3, "mask": 4, "v_range": [5, 60], "toker": "test-cased"}


def _read_all(folder):
    stats = ReaderStats()
    return {im.key: im for shard in resolve_sources([folder]) for im in read_shard(shard, stats)}


def _original_inputs(tmp_path, rng):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    images = {}
    for i, (n, confident) in enumerate([(15, 5), (40, 30), (120, 110)]):
        conf = np.sort(np.concatenate([rng.uniform(0.21, 1, confident), rng.uniform(0, 0.19, n - confident)]))[::-1]
        arrays = {
            "features": rng.random((n, 24)).astype(np.float16),
            "norm_bb": rng.random((n, 6)).astype(np.float16),
            "conf": conf.astype(np.float16),
            "soft_labels": rng.dirichlet(np.ones(11), size=n).astype(np.float16),
        }
        name = f"coco_train2014_{i:012d}.npz"
        np.savez(img_dir / name, **arrays)
        images[name] = arrays
    rows = [{"id": f"{j}", "img_fname": name, "input_ids": rng.integers(5, 60, int(rng.integers(3, 12))).tolist(),
             "raw": f"caption {j}"}
            for j, name in enumerate([*images, *images, "coco_missing.npz"])]
    return img_dir, images, rows


def _expected_regions(conf, min_bb=10, max_bb=100, th=0.2):
    """The reference's rule, written out independently: clip(#(conf > th), min, max)."""
    return int(min(max(min_bb, int((conf.astype(np.float32) > th).sum())), max_bb, len(conf)))


def _check_original(out, images, rows):
    read = _read_all(out)
    assert len(read) == 3
    for name, arrays in images.items():
        image = read[name[: -len(".npz")]]
        k = _expected_regions(arrays["conf"])
        assert len(image.feat) == k
        assert np.array_equal(image.feat, arrays["features"][:k])
        bb = arrays["norm_bb"][:k].astype(np.float32)
        expected_pos = np.concatenate([bb, (bb[:, 4] * bb[:, 5])[:, None]], axis=1)
        assert np.array_equal(image.pos, expected_pos)
        assert np.array_equal(image.soft, arrays["soft_labels"][:k])
        assert [c["input_ids"] for c in image.captions] == [r["input_ids"] for r in rows if r["img_fname"] == name]


def test_original_npz_and_jsonl(tmp_path):
    rng = np.random.default_rng(0)
    img_dir, images, rows = _original_inputs(tmp_path, rng)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "meta.json").write_text(json.dumps(META))
    (tmp_path / "txt" / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest, report = convert_original(img_dir, tmp_path / "txt" / "table.jsonl", tmp_path / "out")
    assert report.captions_without_image == 1 and report.images_written == 3 and report.pairs_written == 6
    assert manifest.tokenizer.random_range == (5, 60) and manifest.tokenizer.cls_id == 2
    assert manifest.img_dim == 24 and manifest.img_label_dim == 11
    _check_original(tmp_path / "out", images, rows)


def test_original_npz_and_lmdb_txt_db(tmp_path):
    import lmdb  # the [convert] extra, part of the [test] extra
    import lz4.frame
    import msgpack

    rng = np.random.default_rng(1)
    img_dir, images, rows = _original_inputs(tmp_path, rng)
    txt_db = tmp_path / "txt_db"
    txt_db.mkdir()
    (txt_db / "meta.json").write_text(json.dumps(META))
    env = lmdb.open(str(txt_db), map_size=2**24)
    with env.begin(write=True) as txn:  # the reference's TxtLmdb: lz4(msgpack(row)) under the example id
        for row in rows:
            value = {k: v for k, v in row.items() if k != "id"}
            txn.put(row["id"].encode(), lz4.frame.compress(msgpack.dumps(value, use_bin_type=True)))
    env.close()
    manifest, report = convert_original(img_dir, txt_db, tmp_path / "out")
    assert report.images_written == 3
    # LMDB iterates keys in byte order; captions of an image keep that order.
    rows_in_key_order = sorted(rows, key=lambda r: r["id"].encode())
    _check_original(tmp_path / "out", images, rows_in_key_order)


def test_original_bad_npz_is_named_or_skipped(tmp_path):
    rng = np.random.default_rng(2)
    img_dir, images, rows = _original_inputs(tmp_path, rng)
    bad = next(iter(images))
    np.savez(img_dir / bad, features=np.zeros((12, 24), np.float16), conf=np.ones(12, np.float16))
    (tmp_path / "meta.json").write_text(json.dumps(META))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{bad}: missing array\(s\) \['norm_bb'\]"):
        convert_original(img_dir, tmp_path / "t.jsonl", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest, report = convert_original(img_dir, tmp_path / "t.jsonl", tmp_path / "out", on_error="skip")
    assert report.skipped_images == 1 and bad in report.problems[0] and manifest.images == 2


def _b64(array):
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def test_bottom_up_tsv_with_captions_and_a_tokenizer_folder(tmp_path):
    from transformers import BertTokenizer

    write_vocab(tmp_path / "vocab.txt", 40)
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(3)
    lines, inputs = [], {}
    for image_id, (w, h) in {"9001": (640, 480), "9002": (500, 375)}.items():
        n = 36
        x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, n), y1 + rng.uniform(5, h / 2, n)], 1)
        feat = rng.random((n, 32)).astype(np.float32)
        lines.append("\t".join([image_id, str(w), str(h), str(n), _b64(boxes), _b64(feat)]))
        inputs[image_id] = (w, h, boxes.astype(np.float32), feat)
    (tmp_path / "feat.tsv").write_text("\n".join(lines) + "\n")
    captions = [{"image_id": 9001, "caption": "A dog next to a cat"}, {"image_id": 9002, "caption": "a photo of a bus"},
                {"image_id": 9001, "caption": "the cat is on the table"}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    manifest, report = convert_tsv(tmp_path / "feat.tsv", tmp_path / "captions.jsonl", tmp_path / "tok",
                                   tmp_path / "out")
    assert manifest.images == 2 and manifest.pairs == 3 and manifest.img_label_dim is None
    assert manifest.tokenizer.random_range[0] == 5  # after [PAD] [UNK] [CLS] [SEP] [MASK]
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "tok")
    read = _read_all(tmp_path / "out")
    for image_id, (w, h, boxes, feat) in inputs.items():
        image = read[image_id]
        assert np.array_equal(image.feat, feat.astype(np.float16))
        bw, bh = (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h
        expected = np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 0] / w + bw, boxes[:, 1] / h + bh,
                             bw, bh, bw * bh], 1)
        np.testing.assert_allclose(image.pos, expected, rtol=1e-6, atol=1e-7)
        want = [tokenizer(c["caption"], add_special_tokens=False)["input_ids"] for c in captions
                if str(c["image_id"]) == image_id]
        assert [c["input_ids"] for c in image.captions] == want
        assert all(t != 1 for ids in want for t in ids)  # no [UNK]: the words are in the vocabulary
    # The tokenizer travels with the converted data, and on into an export: AutoTokenizer, same ids, casing.
    from transformers import AutoTokenizer

    from uniter_ds.export import _export_tokenizer, _training_datasets

    assert manifest.tokenizer.lowercase is True  # BertTokenizer's default
    (tmp_path / "hf").mkdir()
    experiment = {"data": {"train": [{"paths": [str(tmp_path / "out")]}]}}
    info = _export_tokenizer(_training_datasets(experiment), tmp_path / "hf")
    assert info["exported"] and info["lowercase"] is True
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for caption in captions:
        assert exported(caption["caption"])["input_ids"] == tokenizer(caption["caption"])["input_ids"]


def test_cli_synth_inspect_and_a_corrupt_dataset(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "uniter_ds.cli", *a], capture_output=True, text=True)
    result = run("data", "synth", "--out", str(tmp_path / "s"), "--images", "20", "--img-dim", "16",
                 "--img-label-dim", "41", "--max-regions", "30", "--shard-mb", "0.05")
    assert result.returncode == 0, result.stderr
    result = run("data", "inspect", str(tmp_path / "s"), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"] and report["images_read"] == 20
    shard = sorted((tmp_path / "s").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:-1024])
    result = run("data", "inspect", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "shard_size" in result.stdout and shard.name in result.stdout
