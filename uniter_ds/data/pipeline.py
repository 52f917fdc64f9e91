"""One loader worker's pipeline as state that can be saved between two batches and restored.

shards -> images -> pairs (one per caption) -> shuffle buffer -> task transform -> budget batcher.

Each time the batcher cuts its pool into batches, the worker takes a snapshot of everything it holds:
the RNG states, its place in its shard list and in the current shard (a byte offset), and the samples
in the shuffle buffer, the batcher's pool, the batches cut but not yet sent and ITM's recent images,
each as a reference to where its image was read (shard, byte offset) plus what the task transform drew
for it (masked ids, region mask, ITM negative). A batch leaves with its place: (snapshot id, batches
taken since that snapshot), and the first batch after a cut carries the snapshot itself.

Restoring reads the referenced images again (a seek each) and drops the batches already taken: the
next batch is byte for byte the one an uninterrupted worker would have made. The cost is the worker's
buffers (a few thousand images), the same at step 100 and at step 100,000.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..model.tasks import TASKS
from .batching import BudgetBatcher, RowBatcher, TaskSample, TaskTransform
from .format import DataError
from .reader import (
    ImageRecord,
    ImageRef,
    Pair,
    ReaderStats,
    Shard,
    ShardCursor,
    ShuffleBuffer,
    pair_of,
    read_images,
    read_shard,
)


class WorkerPipeline:
    """The batches (groups of samples) of one global worker for one task and epoch."""

    def __init__(self, shards: Sequence[Shard], task: str, config, *, epoch: int, global_worker: int,
                 num_global_workers: int, stats: ReaderStats | None = None):
        self.shards, self.task, self.config = list(shards), task, config
        self.global_worker, self.num_global_workers = global_worker, num_global_workers
        self.tokenizer = self.shards[0].manifest.tokenizer
        # One independent, reproducible random stream per (seed, epoch, task, worker).
        seed_words = [config.seed, epoch, TASKS.index(task), global_worker]
        self.shuffle_rng = random.Random("-".join(map(str, seed_words)))
        self.np_rng = np.random.default_rng(seed_words)
        self.stats = stats or ReaderStats()
        self.cursor = ShardCursor(self.shards, mode=config.split, seed=config.seed, epoch=epoch,
                                  global_worker=global_worker, num_global_workers=num_global_workers)
        self.reader: Iterator[ImageRecord] | None = None  # the current shard's images
        self.image: ImageRecord | None = None  # the image whose captions become pairs
        self.caption = 0  # its next caption
        self.buffer = ShuffleBuffer(config.shuffle_buffer, self.shuffle_rng)
        self.transform = TaskTransform(task, self.tokenizer, self.np_rng, mask_prob=config.mask_prob,
                                       itm_neg_prob=config.itm_neg_prob, joint_masking=config.masking == "joint")
        if config.batching == "rows":
            self.batcher = RowBatcher(config.token_budget, config.pack_row_len, config.pool_budgets, self.np_rng,
                                      config.min_pool_tokens)
        else:
            self.batcher = BudgetBatcher(config.token_budget, config.pool_budgets, self.np_rng, config.min_pool_tokens)
        self.input_done = False
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_id = 0
        self.taken = 0  # batches taken since the snapshot

    # -- the stream ----------------------------------------------------------------------------

    def groups(self) -> Iterator[tuple[list[TaskSample], dict[str, Any]]]:
        """Each batch's samples, with the place to resume after it."""
        while True:
            if self.batcher.pending:
                self.taken += 1
                place: dict[str, Any] = {"id": self.snapshot_id, "taken": self.taken}
                if self.taken == 1:
                    place["snapshot"] = self.snapshot
                yield self.batcher.pending.popleft(), place
                continue
            if self.input_done:
                return
            sample = self._next_sample()
            if sample is None:
                self.batcher.finish()
                self.input_done = True
            elif not self.batcher.add(sample):
                continue
            if self.batcher.pending:
                self.snapshot_id += 1
                self.taken = 0
                self.snapshot = self.state_dict()

    def _next_sample(self) -> TaskSample | None:
        while True:
            if self.buffer.draining:
                pair = self.buffer.drain()
                return None if pair is None else self.transform(pair)
            pair = self._next_pair()
            if pair is None:
                self.buffer.finish()
                continue
            out = self.buffer.add(pair)
            if out is not None:
                return self.transform(out)

    def _next_pair(self) -> Pair | None:
        cfg = self.config
        while True:
            while self.image is not None and self.caption < len(self.image.captions):
                self.caption += 1
                pair = pair_of(self.image, self.caption - 1, self.tokenizer, cfg.max_text_len, self.stats)
                if pair is not None:
                    return pair
            self.image, self.caption = self._next_image(), 0
            if self.image is None:
                return None

    def _next_image(self) -> ImageRecord | None:
        cfg = self.config
        while True:
            if self.reader is None:
                shard = self.cursor.next()
                if shard is None:
                    return None
                self.reader = read_shard(shard, self.stats, cfg.on_error, cfg.cache_dir)
            image = next(self.reader, None)
            if image is not None:
                return image
            self.reader = None
            if not self.stats.images and self.cursor.taken >= 2 * len(self.shards):  # resampled would spin forever
                raise DataError(f"{self.task} loader, worker {self.global_worker}: not one usable image in "
                                f"{self.cursor.taken} shards ({self.stats.corrupt_shards} corrupt, "
                                f"{self.stats.skipped_images} samples skipped); last errors: {self.stats.last_errors}")

    # -- saving and restoring ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the worker holds, images by reference. Taken right after a cut: the reader then
        stands right after ``self.image`` (the image of the last pair read), or the input is done."""
        refs: dict[ImageRef, int] = {}

        def image(record: ImageRecord) -> int:
            return refs.setdefault(record.ref, len(refs))

        def sample(s: TaskSample) -> tuple:
            return (image(s.pair_image), s.pair_id[1], image(s.shown_image), s.input_ids.astype(np.int32),
                    None if s.txt_labels is None else s.txt_labels.astype(np.int32), s.img_mask, s.itm_target,
                    s.pack_row)

        state = {
            "id": self.snapshot_id,
            "reading": None if self.image is None else {"image": image(self.image), "caption": self.caption,
                                                        "end": self.image.end},
            "cursor": self.cursor.state_dict(),
            "shuffle": {"rng": self.shuffle_rng.getstate(), "draining": self.buffer.draining,
                        "items": [(image(p.image), p.caption_index) for p in self.buffer.items]},
            "np_rng": self.np_rng.bit_generator.state,
            "itm": {"pool": [image(im) for im in self.transform.pool],
                    "forced_positives": self.transform.forced_positives},
            "batcher": {"pool": [sample(s) for s in self.batcher.pool],
                        "pending": [[sample(s) for s in group] for group in self.batcher.pending]},
            "input_done": self.input_done,
            "stats": self.stats.as_dict(),
        }
        state["images"] = list(refs)  # index -> (shard location, byte offset, index in shard)
        return state

    def restore(self, state: dict[str, Any], taken: int) -> None:
        """Continue as the worker that saved ``state`` did after taking ``taken`` of its batches."""
        cfg = self.config
        found = read_images(state["images"], self.shards, cfg.cache_dir)
        images = [found[tuple(ref)] for ref in state["images"]]

        def sample(saved: tuple) -> TaskSample:
            pair_image, caption, shown, input_ids, labels, mask, target, *row = saved  # no row: saved before rows
            pair_image, shown = images[pair_image], images[shown]
            return TaskSample((pair_image.key, caption), shown.key, input_ids.astype(np.int64), shown.feat,
                              shown.pos, shown.soft, None if labels is None else labels.astype(np.int64), mask,
                              target, pair_image=pair_image, shown_image=shown, pack_row=row[0] if row else None)

        self.cursor.load_state_dict(state["cursor"])
        reading = state["reading"]
        self.image, self.caption, self.reader = None, 0, None
        if reading is not None:
            self.image, self.caption = images[reading["image"]], reading["caption"]
            shard = next(s for s in self.shards if str(s.path) == self.image.location)
            self.reader = read_shard(shard, self.stats, cfg.on_error, cfg.cache_dir,
                                     start=(reading["end"], self.image.index + 1))
        self.shuffle_rng.setstate(state["shuffle"]["rng"])
        self.buffer.items = [pair_of(images[i], caption, self.tokenizer) for i, caption in state["shuffle"]["items"]]
        self.buffer.draining = state["shuffle"]["draining"]
        self.np_rng.bit_generator.state = state["np_rng"]
        self.transform.pool = deque((images[i] for i in state["itm"]["pool"]), maxlen=self.transform.pool.maxlen)
        self.transform.forced_positives = state["itm"]["forced_positives"]
        self.batcher.pool = [sample(s) for s in state["batcher"]["pool"]]
        self.batcher.pooled = sum(s.num_tokens for s in self.batcher.pool)
        self.batcher.pending = deque([sample(s) for s in group] for group in state["batcher"]["pending"][taken:])
        self.input_done = state["input_done"]
        saved = state["stats"]
        for name in ("images", "pairs", "skipped_images", "corrupt_shards", "lost_images", "dropped_long_captions"):
            setattr(self.stats, name, saved[name])
        self.stats.errors.clear()
        self.stats.errors.update(saved["errors"])
        self.stats.last_errors = list(saved["last_errors"])
        self.snapshot, self.snapshot_id, self.taken = state, state["id"], taken


__all__ = ["WorkerPipeline"]
