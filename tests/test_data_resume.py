"""Exact resume of the data in O(1): a loader restored from its workers' saved places continues with
the very batches an uninterrupted loader makes, without reading the batches already taken."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from uniter_ds.data import DataError, LoaderConfig, LoaderStats, StreamDataset, build_loader, synth_dataset
from uniter_ds.data import reader as reader_module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume") / "synth"
    synth_dataset(folder, images=160, img_dim=16, img_label_dim=41, min_regions=5, max_regions=30,
                  max_shard_bytes=30_000, seed=4)
    return folder


# A pool of ~2k tokens, so that the batcher cuts many times per epoch (the default pool is 2^18 tokens).
SMALL = {"token_budget": 300, "pool_budgets": 2, "min_pool_tokens": 1500, "shuffle_buffer": 30, "seed": 3}


def _content(batch) -> tuple:
    tensors = tuple(value.tolist() for _, value in sorted(vars(batch).items()) if isinstance(value, torch.Tensor))
    return tensors, batch.meta["pairs"], batch.meta["images"], batch.meta["reader"]


def _run(stream_or_loader, limit: int | None, stats: LoaderStats | None = None) -> tuple[list, list]:
    """Each batch's content, and the consumer's resume state after it."""
    contents, states = [], []
    for batch in itertools.islice(stream_or_loader, limit):
        if stats is not None:
            stats.update(batch)
            states.append(copy.deepcopy(stats.resume_state()))
        contents.append(_content(batch))
    return contents, states


@pytest.mark.parametrize("task", ["mlm", "mrc-kl", "itm"])
@pytest.mark.parametrize("split", ["exact", "resampled"])
def test_a_restored_stream_continues_with_the_uninterrupted_batches(corpus, task, split):
    config = LoaderConfig(num_workers=0, split=split, **SMALL)
    limit = None if split == "exact" else 70
    reference, states = _run(StreamDataset([corpus], task, config, rank=1, world_size=2), limit, LoaderStats())
    assert len(reference) > 15
    for taken in [1, 2, 5, 11, 17, len(reference) - 2, len(reference) - 1]:
        resumed, _ = _run(StreamDataset([corpus], task, config, rank=1, world_size=2, resume=states[taken - 1]),
                          None if limit is None else limit - taken)
        assert resumed == reference[taken:], f"resumed after batch {taken}"


@pytest.mark.parametrize("split", ["exact", "resampled"])
def test_a_restored_row_filling_stream_continues_with_the_uninterrupted_batches(corpus, split):
    """The packed layout's batcher: the samples' rows travel in the saved places too."""
    config = LoaderConfig(num_workers=0, split=split, batching="rows", layout="packed", pack_row_len=100, **SMALL)
    limit = None if split == "exact" else 60
    reference, states = _run(StreamDataset([corpus], "mlm", config), limit, LoaderStats())
    assert len(reference) > 15
    for taken in [1, 4, 13, len(reference) - 1]:
        resumed, _ = _run(StreamDataset([corpus], "mlm", config, resume=states[taken - 1]),
                          None if limit is None else limit - taken)
        assert resumed == reference[taken:], f"resumed after batch {taken}"


def test_resuming_reads_what_the_workers_held_not_the_batches_taken(corpus, monkeypatch):
    """Images decoded until the first batch after a resume: the same at batch 10 and batch 120 (the
    workers' buffers), while re-reading the taken batches (replay) would decode ~10x more at 120."""
    config = LoaderConfig(num_workers=0, split="resampled", **SMALL)
    decoded = [0]
    decode = reader_module._decode

    def counting(*args):
        decoded[0] += 1
        return decode(*args)

    monkeypatch.setattr(reader_module, "_decode", counting)
    stats = LoaderStats()
    states, read_by = [], []
    for batch in itertools.islice(StreamDataset([corpus], "mlm", config), 121):
        stats.update(batch)
        states.append(copy.deepcopy(stats.resume_state()))
        read_by.append(decoded[0])
    cost = {}
    for taken in (10, 120):
        decoded[0] = 0
        next(iter(StreamDataset([corpus], "mlm", config, resume=states[taken - 1])))
        cost[taken] = decoded[0]
    assert cost[120] <= 2 * cost[10], cost
    assert cost[120] * 5 < read_by[119], (cost, read_by[119])


def test_two_loader_workers_resume_in_turn_across_the_end_of_an_epoch(corpus):
    """Workers run out at different batches near an exact epoch's end; the DataLoader takes batches in
    turn from those left. A resumed loader starts with the worker that was next, and ends alike."""
    config = LoaderConfig(num_workers=2, split="exact", **SMALL)
    stats = LoaderStats(num_workers=2)
    reference, states = _run(build_loader([corpus], "mrfr", config, rank=0, world_size=1, epoch=2), None, stats)
    workers = [content[3] for content in reference]  # reader counts: which worker made each batch is in meta
    assert len(reference) > 25 and workers
    for taken in [1, 8, len(reference) - 3, len(reference) - 1]:
        resumed_stats = LoaderStats(num_workers=2, resume=states[taken - 1])
        loader = build_loader([corpus], "mrfr", config, rank=0, world_size=1, epoch=2, resume=states[taken - 1])
        resumed, _ = _run(loader, None, resumed_stats)
        assert resumed == reference[taken:], f"resumed after batch {taken}"
        assert resumed_stats.totals() == stats.totals() | {k: resumed_stats.totals()[k] for k in
                                                           ("batches", "real_tokens", "padded_tokens",
                                                            "padding_fraction")}


def test_the_workers_run_out_unevenly_in_that_epoch(corpus):
    """The previous test covers the uneven end only if the two workers' batch counts differ."""
    config = LoaderConfig(num_workers=0, split="exact", **SMALL)
    counts = [sum(1 for _ in StreamDataset([corpus], "mrfr", config, rank=r, world_size=2, epoch=2)) for r in (0, 1)]
    assert counts[0] != counts[1], counts


def test_a_saved_place_in_a_shard_the_dataset_no_longer_lists_is_named(corpus, tmp_path):
    config = LoaderConfig(num_workers=0, split="resampled", **SMALL)
    stats = LoaderStats()
    _run(StreamDataset([corpus], "mlm", config), 5, stats)
    state = stats.resume_state()
    snapshot = state["workers"][0]["snapshot"]
    location = snapshot["images"][0][0]
    snapshot["images"] = [(str(tmp_path / "gone.tar"), *ref[1:]) if ref[0] == location else ref
                          for ref in snapshot["images"]]
    with pytest.raises(DataError, match="gone.tar.*no longer lists"):
        next(iter(StreamDataset([corpus], "mlm", config, resume=state)))


def test_the_training_feed_resumes_exactly_and_refuses_a_changed_data_setup(corpus, tmp_path, caplog):
    """DataFeed (the job's side): its checkpoint state continues each stream with the next batch; a
    change that moves the workers' places (workers, budget) is refused naming the keys."""
    import yaml

    from uniter_ds.train.config import load_config
    from uniter_ds.train.feed import DataFeed
    from uniter_ds.train.scheduler import Stream

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
        "data": {"train": [{"name": "s", "paths": [str(corpus)], "tasks": {"mlm": 1, "itm": 1}}],
                 "num_workers": 0, "token_budget": 300, "shuffle_buffer": 30}}))
    config = load_config(path)
    streams = [Stream("s", "mlm"), Stream("s", "itm")]
    feed = DataFeed(config, streams, 0, 1)
    for stream in streams * 3:
        feed.next(stream)
    state = copy.deepcopy(feed.state_dict())
    expected = [feed.next(stream).meta["pairs"] for stream in streams * 2]
    resumed = DataFeed(config, streams, 0, 1, state)
    assert [resumed.next(stream).meta["pairs"] for stream in streams * 2] == expected
    assert resumed.counts() == feed.counts()
    # Rank 0's light copy (DeepSpeed's client state: no worker places), as a rank whose own file is gone
    # gets it: replayed, with a warning, to the same batches.
    light = copy.deepcopy(state)
    for where in light["positions"].values():
        del where["workers"]
    with caplog.at_level("WARNING", logger="uniter_ds.pretrain"):
        replayed = DataFeed(config, streams, 0, 1, light)
    assert "replaying its 3 batches" in caplog.text
    assert [replayed.next(stream).meta["pairs"] for stream in streams * 2] == expected
    changed = load_config(path, ["data.num_workers=1", "data.token_budget=400"])
    with pytest.raises(DataError, match=r"data.num_workers 0 -> 1; data.token_budget 300 -> 400.*data.resume: reseed"):
        DataFeed(changed, streams, 0, 1, state)


def test_a_consumer_that_skipped_batches_counts_but_cannot_give_a_resume_state(corpus):
    config = LoaderConfig(num_workers=0, split="resampled", **SMALL)
    stream = iter(StreamDataset([corpus], "mlm", config))
    next(stream)  # the first batch carries the snapshot: a warm-up that skips it
    stats = LoaderStats()
    stats.update(next(stream))
    assert stats.totals()["batches"] == 1
    with pytest.raises(RuntimeError, match=r"loader workers \[0\].*not known"):
        stats.resume_state()
