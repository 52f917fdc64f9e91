"""The data path: shard format, manifest checks, splitting, masking statistics, errors, batching."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from uniter_ds.data import (
    DataError,
    DatasetWriter,
    LoaderConfig,
    LoaderStats,
    Manifest,
    ReaderStats,
    StreamDataset,
    TaskTransform,
    TokenizerInfo,
    budget_batches,
    build_loader,
    mask_regions,
    mask_text,
    read_shard,
    resolve_sources,
    synth_dataset,
)
from uniter_ds.data.reader import Pair, pairs_of
from uniter_ds.model import IGNORE_INDEX, UniterConfig, UniterForPretraining

TOKENIZER = TokenizerInfo(name="test", vocab_size=100, vocab_sha256="x", cls_id=2, sep_id=3, mask_id=4, pad_id=0,
                          random_range=(5, 100))


def _write_random(folder, images=12, img_dim=16, label_dim=9, seed=0, shard_bytes=20_000):
    rng = np.random.default_rng(seed)
    written = {}
    with DatasetWriter(folder, name="t", img_dim=img_dim, img_label_dim=label_dim, tokenizer=TOKENIZER,
                       max_shard_bytes=shard_bytes) as writer:
        for i in range(images):
            n = int(rng.integers(3, 12))
            feat = rng.standard_normal((n, img_dim)).astype(np.float16)
            pos = rng.random((n, 7)).astype(np.float32)
            soft = rng.dirichlet(np.ones(label_dim), size=n).astype(np.float16)
            caps = [{"id": f"c{i}_{j}", "text": "x",
                     "input_ids": rng.integers(5, 100, int(rng.integers(1, 9))).tolist()}
                    for j in range(int(rng.integers(1, 4)))]
            writer.add(f"img.{i}/a", feat, pos, caps, soft=soft, conf=rng.random(n))
            written[f"img_{i}_a"] = (feat, pos, soft, caps)
    return written


def test_writer_reader_round_trip_is_exact(tmp_path):
    written = _write_random(tmp_path / "d")
    manifest = Manifest.load(tmp_path / "d")
    assert len(manifest.shards) > 1 and manifest.images == 12
    assert manifest.pairs == sum(len(caps) for *_, caps in written.values())
    stats, seen = ReaderStats(), {}
    for shard in resolve_sources([tmp_path / "d"]):
        for image in read_shard(shard, stats):
            seen[image.key] = image
    assert set(seen) == set(written)  # dots and slashes in ids become underscores: valid WebDataset keys
    for key, (feat, pos, soft, caps) in written.items():
        image = seen[key]
        assert image.feat.dtype == np.float16 and np.array_equal(image.feat, feat)
        assert np.array_equal(image.pos, pos) and np.array_equal(image.soft, soft)
        assert [c["input_ids"] for c in image.captions] == [c["input_ids"] for c in caps]
        pairs = list(pairs_of(image, TOKENIZER, None, stats))
        assert [p.input_ids.tolist() for p in pairs] == [[2, *c["input_ids"], 3] for c in caps]
    assert not list(tmp_path.glob("d/*.tmp"))


def test_shards_read_with_the_webdataset_library(tmp_path):
    import webdataset as wds

    written = _write_random(tmp_path / "d")
    urls = sorted(str(p) for p in (tmp_path / "d").glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert set(samples) == set(written)
    key = next(iter(written))
    assert np.array_equal(samples[key]["feat.npy"], written[key][0])
    assert samples[key]["json"]["captions"][0]["input_ids"] == written[key][3][0]["input_ids"]


def test_writer_validates_and_an_interrupted_write_leaves_no_dataset(tmp_path):
    with pytest.raises(DataError, match=r"image 'b': feat must have shape \(3, 16\), got \(3, 8\)"), \
            DatasetWriter(tmp_path / "d", name="t", img_dim=16, img_label_dim=None, tokenizer=TOKENIZER,
                          max_shard_bytes=3000) as w:
        for i in range(4):
            w.add(f"ok{i}", np.zeros((3, 16)), np.zeros((3, 7)), [{"input_ids": [5]}])
        w.add("b", np.zeros((3, 8)), np.zeros((3, 7)), [{"input_ids": [5]}])
    # Complete shards may remain, but no partial shard and no manifest: nothing reads the folder.
    assert list((tmp_path / "d").glob("*.tar"))
    assert not (tmp_path / "d" / "manifest.json").exists()
    assert not list((tmp_path / "d").glob("*.tmp"))
    with pytest.raises(DataError, match="no manifest.json"):
        Manifest.load(tmp_path / "d")


def test_manifest_refuses_a_model_or_tokenizer_that_does_not_match(tmp_path):
    synth_dataset(tmp_path / "s", images=6, img_dim=32, img_label_dim=17, num_classes=8, max_regions=12)
    stream = StreamDataset([tmp_path / "s"], "mrc", LoaderConfig())
    stream.check_model(img_dim=32, img_label_dim=17, vocab_size=512)
    with pytest.raises(DataError, match="img_dim: data has 32-d features, the model expects 2048"):
        stream.check_model(img_dim=2048, img_label_dim=17, vocab_size=512)
    with pytest.raises(DataError, match="vocab_size: the data's tokenizer has"):
        stream.check_model(img_dim=32, img_label_dim=17, vocab_size=20)
    synth_dataset(tmp_path / "nosoft", images=4, img_dim=32, img_label_dim=None, num_classes=8, max_regions=12)
    with pytest.raises(DataError, match="no detector soft labels, which MRC / MRC-kl need"):
        StreamDataset([tmp_path / "nosoft"], "mrc-kl", LoaderConfig()).check_model(img_dim=32, img_label_dim=17,
                                                                                vocab_size=512)
    synth_dataset(tmp_path / "other", images=4, img_dim=32, img_label_dim=17, num_classes=12, max_regions=12)
    with pytest.raises(DataError, match="tokenizer"):
        resolve_sources([tmp_path / "s", tmp_path / "other"])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version 99"):
        Manifest.load(tmp_path / "s")


def test_synth_is_deterministic_and_its_vocab_tokenizes_the_captions(tmp_path):
    from transformers import BertTokenizer

    synth_dataset(tmp_path / "a", images=5, img_dim=16, img_label_dim=None, max_regions=12, seed=3)
    synth_dataset(tmp_path / "b", images=5, img_dim=16, img_label_dim=None, max_regions=12, seed=3)
    for a, b in zip(sorted((tmp_path / "a").glob("*.tar")), sorted((tmp_path / "b").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()
    tokenizer = BertTokenizer(vocab=str(tmp_path / "a" / "vocab.txt"), do_lower_case=True)
    stats = ReaderStats()
    for shard in resolve_sources([tmp_path / "a"]):
        for image in read_shard(shard, stats):
            for caption in image.captions:
                assert tokenizer(caption["text"], add_special_tokens=False)["input_ids"] == caption["input_ids"]
            assert len(image.feat) >= 10
    assert stats.images == 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "synth"
    synth_dataset(folder, images=96, img_dim=16, img_label_dim=41, min_regions=10, max_regions=40,
                  max_shard_bytes=24_000, seed=1)
    return folder


def _all_pairs(folder) -> Counter:
    manifest = Manifest.load(folder)
    stats, pairs = ReaderStats(), Counter()
    for shard in resolve_sources([folder]):
        for image in read_shard(shard, stats):
            pairs.update((image.key, i) for i in range(len(image.captions)))
    assert sum(pairs.values()) == manifest.pairs
    return pairs


def test_exact_split_over_two_ranks_and_two_workers_sees_every_pair_once(corpus):
    assert len(Manifest.load(corpus).shards) >= 8
    config = LoaderConfig(num_workers=2, token_budget=600, split="exact", seed=5, max_text_len=None)
    for epoch in (0, 1):
        seen: Counter = Counter()
        by_rank = []
        for rank in (0, 1):
            loader = build_loader([corpus], "mlm", config, rank=rank, world_size=2, epoch=epoch)
            rank_pairs = [tuple(p) for batch in loader for p in batch.meta["pairs"]]
            by_rank.append(set(rank_pairs))
            seen.update(rank_pairs)
        assert seen == _all_pairs(corpus)
        assert not (by_rank[0] & by_rank[1]) and by_rank[0] and by_rank[1]


def test_resampled_stream_is_reproducible_for_a_seed(corpus):
    def first_pairs(seed):
        config = LoaderConfig(num_workers=2, token_budget=600, split="resampled", seed=seed, shuffle_buffer=50)
        loader = build_loader([corpus], "itm", config, rank=1, world_size=2)
        out = []
        for batch in loader:
            out.append((tuple(map(tuple, batch.meta["pairs"])), batch.itm_targets.tolist()))
            if len(out) == 12:
                break
        return out

    assert first_pairs(7) == first_pairs(7)
    assert first_pairs(7) != first_pairs(8)


def test_mlm_masking_statistics():
    rng = np.random.default_rng(0)
    chosen = replaced_mask = replaced_random = kept = total = 0
    for _ in range(4000):
        ids = np.array([2, *rng.integers(5, 100, size=int(rng.integers(3, 30))), 3])
        corrupted, labels = mask_text(ids, TOKENIZER, rng)
        targets = labels != IGNORE_INDEX
        assert not targets[0] and not targets[-1] and corrupted[0] == 2 and corrupted[-1] == 3
        assert targets.sum() >= 1
        assert np.array_equal(labels[targets], ids[targets])
        assert np.array_equal(corrupted[~targets], ids[~targets])
        chosen += targets.sum()
        total += len(ids) - 2
        replaced_mask += (corrupted[targets] == 4).sum()
        kept += (corrupted[targets] == ids[targets]).sum()
        replaced_random += ((corrupted[targets] != 4) & (corrupted[targets] != ids[targets])).sum()
        assert np.all((corrupted >= 5) | np.isin(corrupted, [2, 3, 4]))
    # 15% plus the "at least one" fallback on short captions.
    assert 0.15 <= chosen / total <= 0.17
    assert abs(replaced_mask / chosen - 0.8) < 0.02 + 0.02  # the fallback adds [MASK]s
    # A random replacement can draw the original id (1 in 95); that counts as kept.
    assert abs(replaced_random / chosen - 0.1) < 0.015
    assert abs(kept / chosen - 0.1) < 0.015


def test_region_masking_statistics():
    rng = np.random.default_rng(1)
    masked = total = 0
    for _ in range(3000):
        n = int(rng.integers(10, 101))
        chosen = mask_regions(n, rng)
        assert chosen.sum() >= 1
        masked += chosen.sum()
        total += n
    assert abs(masked / total - 0.15) < 0.005
    assert mask_regions(1, rng).tolist() == [True]


def test_itm_negatives_are_half_and_never_the_own_image(corpus):
    stats = ReaderStats()
    tokenizer = Manifest.load(corpus).tokenizer
    pairs = [p for shard in resolve_sources([corpus]) for image in read_shard(shard, stats)
             for p in pairs_of(image, tokenizer, None, stats)]
    transform = TaskTransform("itm", tokenizer, np.random.default_rng(0))
    targets = []
    for _ in range(20):
        for pair in pairs:
            sample = transform(pair)
            targets.append(sample.itm_target)
            if sample.itm_target == 0:
                assert sample.image_key != pair.image.key
            else:
                assert sample.image_key == pair.image.key and sample.feat is pair.image.feat
    assert abs(1 - np.mean(targets) - 0.5) < 0.02
    assert transform.forced_positives <= 1


def test_conditional_and_joint_masking_per_task(corpus):
    tokenizer = Manifest.load(corpus).tokenizer
    stats = ReaderStats()
    image = next(read_shard(resolve_sources([corpus])[0], stats))
    pair = Pair(image, 0, np.array([tokenizer.cls_id, *image.captions[0]["input_ids"], tokenizer.sep_id]))
    rng = np.random.default_rng(0)
    mlm = TaskTransform("mlm", tokenizer, rng)(pair)
    mrfr = TaskTransform("mrfr", tokenizer, rng)(pair)
    assert mlm.txt_labels is not None and mlm.img_mask is None
    assert mrfr.img_mask is not None and mrfr.txt_labels is None and np.array_equal(mrfr.input_ids, pair.input_ids)
    joint = TaskTransform("mrc-kl", tokenizer, rng, joint_masking=True)(pair)
    assert joint.img_mask is not None and joint.txt_labels is not None


def test_token_budget_batches_keep_every_sample_and_little_padding(corpus):
    config = LoaderConfig(num_workers=0, token_budget=800, split="exact", max_text_len=None)
    stats = LoaderStats()
    count = 0
    for batch in build_loader([corpus], "mrfr", config):
        stats.update(batch)
        count += batch.batch_size
        assert batch.padded_tokens() <= 800 or batch.batch_size == 1
        assert batch.meta["padded_tokens"] == batch.padded_tokens()
        assert batch.meta["real_tokens"] == batch.real_tokens()
    totals = stats.totals()
    assert count == Manifest.load(corpus).pairs == totals["pairs"]
    assert totals["padding_fraction"] < 0.10


def test_budget_batcher_on_its_own():
    from uniter_ds.data.batching import TaskSample

    rng = random.Random(0)
    lengths = [rng.randint(5, 150) for _ in range(1000)]
    samples = [TaskSample(("k", i), "k", np.zeros(n, dtype=np.int64), np.zeros((0, 4)), np.zeros((0, 7)), None)
               for i, n in enumerate(lengths)]
    batches = list(budget_batches(iter(samples), 1024))
    assert sorted(s.pair_id[1] for b in batches for s in b) == list(range(1000))
    assert all(len(b) * max(s.num_tokens for s in b) <= 1024 for b in batches)
    padded = sum(len(b) * max(s.num_tokens for s in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.10
    # A small pool loses nothing either; it only pads more.
    small = list(budget_batches(iter(samples), 1024, pool_budgets=1))
    assert sorted(s.pair_id[1] for b in small for s in b) == list(range(1000))


@pytest.mark.parametrize("budget", [4096, 8192, 16384, 32768, 49152, 65536])
def test_budget_batcher_fills_large_budgets(budget):
    """10-100 regions + 8-30 words: every budget from 4k to 64k is filled (the length-bucket batcher
    this replaced ran 0.70 of a 32k budget and 0.29 of a 64k one on this data)."""
    from uniter_ds.data.batching import TaskSample

    rng = np.random.default_rng(budget)
    count = 40 * budget // 65  # about 40 budgets of samples: several pools
    texts, regions = rng.integers(8, 31, count), rng.integers(10, 101, count)
    samples = [TaskSample(("k", i), "k", np.zeros(t, dtype=np.int64), np.zeros((r, 0)), np.zeros((r, 0)), None)
               for i, (t, r) in enumerate(zip(texts, regions))]
    batches = list(budget_batches(iter(samples), budget))
    assert sorted(s.pair_id[1] for b in batches for s in b) == list(range(count))
    assert all(len(b) * max(s.num_tokens for s in b) <= budget for b in batches)
    full = batches[:-1]  # the stream's last batch takes what is left
    padded = [len(b) * max(s.num_tokens for s in b) for b in full]
    real = [sum(s.num_tokens for s in b) for b in full]
    assert min(padded) >= 0.95 * budget
    assert sum(real) / len(full) >= 0.90 * budget
    assert 1 - sum(real) / sum(padded) < 0.08


def test_batches_feed_the_model(corpus):
    config = LoaderConfig(num_workers=0, token_budget=600)
    model_config = UniterConfig.from_preset("tiny", img_dim=16, img_label_dim=41, vocab_size=128)
    model = UniterForPretraining(model_config)
    for task in ("mlm", "mrfr", "mrc", "mrc-kl", "itm"):
        stream = StreamDataset([corpus], task, config)
        stream.check_model(img_dim=16, img_label_dim=41, vocab_size=128)
        batch = next(iter(stream))
        out = model(batch, task)
        assert torch.isfinite(out.loss) and out.num_items > 0, task


def _corrupt_copy(corpus, tmp_path):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(corpus, folder)
    return folder, Manifest.load(folder)


def test_truncated_shard_raises_or_is_skipped_and_counted(corpus, tmp_path):
    folder, manifest = _corrupt_copy(corpus, tmp_path)
    victim = folder / manifest.shards[2].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    stream = StreamDataset([folder], "mlm", LoaderConfig(num_workers=0, on_error="raise", split="exact"))
    with pytest.raises(DataError, match=rf"{victim.name}: \d+ bytes on disk, the manifest says {len(data)} bytes"):
        list(stream)
    stream = StreamDataset([folder], "mlm", LoaderConfig(num_workers=0, on_error="skip", split="exact",
                                                      max_text_len=None))
    stats = LoaderStats()
    pairs = sum(b.batch_size for b in stream if stats.update(b) is None)
    totals = stats.totals()
    assert totals["corrupt_shards"] == 1 and totals["errors"] == {"shard_size": 1}
    assert pairs == manifest.pairs - manifest.shards[2].pairs


def test_a_damaged_tar_header_names_the_shard_or_is_counted(corpus, tmp_path):
    """4 KiB of non-octal text over the middle of a shard (headers' number fields included)."""
    folder, manifest = _corrupt_copy(corpus, tmp_path)
    victim = folder / manifest.shards[1].name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"9" * 4096
    victim.write_bytes(bytes(data))
    shard = resolve_sources([victim])[0]
    with pytest.raises(DataError, match=rf"{victim.name}: corrupt or truncated tar after \d+ of {shard.images}"):
        list(read_shard(shard, ReaderStats()))
    stats = ReaderStats()
    images = list(read_shard(shard, stats, on_error="skip"))
    assert len(images) < shard.images and stats.corrupt_shards == 1 and stats.errors["corrupt_shard"] == 1


def test_corrupt_tar_with_the_right_size_is_reported(corpus, tmp_path):
    folder, manifest = _corrupt_copy(corpus, tmp_path)
    victim = folder / manifest.shards[1].name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 2048] = b"\xff" * 2048  # garbage over headers and data
    victim.write_bytes(bytes(data))
    stats = ReaderStats()
    shard = resolve_sources([victim])[0]
    with pytest.raises(DataError, match=victim.name):
        list(read_shard(shard, stats))
    list(read_shard(shard, stats, on_error="skip"))
    assert stats.corrupt_shards + stats.skipped_images >= 1 and stats.last_errors


def test_wrong_feature_shape_names_shard_and_sample(corpus, tmp_path):
    folder, manifest = _corrupt_copy(corpus, tmp_path)
    shard_path = folder / manifest.shards[0].name
    with tarfile.open(shard_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[0][0].name.split(".")[0]
    from uniter_ds.data.format import npy_bytes

    rewritten = []
    for info, data in members:
        if info.name == f"{bad_key}.feat.npy":
            data = npy_bytes(np.zeros((5, 8), dtype=np.float16))
            info.size = len(data)
        rewritten.append((info, data))
    import io

    with tarfile.open(shard_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in rewritten:
            tar.addfile(info, io.BytesIO(data))
    manifest.shards[0].bytes = shard_path.stat().st_size  # the manifest agrees: only the sample is bad
    manifest.save(folder)
    shard = resolve_sources([shard_path])[0]
    with pytest.raises(DataError, match=rf"{shard_path.name}: sample '{bad_key}': feat has shape \(5, 8\), "
                                        rf"expected \[N >= 1, 16\]") as raised:
        list(read_shard(shard, ReaderStats()))
    assert "corrupt" not in str(raised.value)  # a bad sample is not reported as a bad shard
    stats = ReaderStats()
    images = list(read_shard(shard, stats, on_error="skip"))
    assert len(images) == manifest.shards[0].images - 1
    assert stats.skipped_images == 1 and stats.errors == {"bad_sample": 1}
    assert bad_key in stats.last_errors[0]


def test_long_captions_are_dropped_and_counted(corpus):
    config = LoaderConfig(num_workers=0, max_text_len=6, split="exact")
    stats = LoaderStats()
    pairs = sum(b.batch_size for b in StreamDataset([corpus], "itm", config) if stats.update(b) is None)
    totals = stats.totals()
    assert totals["dropped_long_captions"] > 0
    assert pairs + totals["dropped_long_captions"] == Manifest.load(corpus).pairs


def test_the_loaders_fork_server_preloads_a_main_module_of_the_package_only(monkeypatch):
    """A loader worker re-runs the main module before it reads a shard: under the launcher that is the
    pretraining entry point, whose imports took ~4 s per worker (every stream's first batch and every exact
    epoch waited for them). The fork server imports it once; a user's script is never imported there."""
    import importlib.machinery
    import sys
    import types

    from uniter_ds.data.loader import forkserver_preload

    def main_named(name: str | None) -> types.ModuleType:
        module = types.ModuleType("__main__")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None) if name else None
        return module

    base = ["uniter_ds.data.loader", "uniter_ds.data.forkserver_preload"]
    monkeypatch.setitem(sys.modules, "__main__", main_named("uniter_ds.train.pretrain"))
    assert forkserver_preload() == base + ["uniter_ds.train.pretrain"]
    for user_main in ("train_my_model", None):  # `python -m train_my_model`, `python script.py`
        monkeypatch.setitem(sys.modules, "__main__", main_named(user_main))
        assert forkserver_preload() == base
