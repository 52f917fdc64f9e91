"""The data loader of one pretraining task: shards on disk -> ready :class:`UniterBatch` es.

Everything per sample (read, decode, mask, batch, collate) runs inside the DataLoader workers; the
training process only receives finished batches (pinned when a GPU is present).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..model.inputs import UniterBatch
from ..model.tasks import SOFT_LABEL_TASKS, TASKS, check_task
from .batching import collate
from .format import DataError, Manifest, check_compatible
from .loader_config import LoaderConfig
from .pipeline import WorkerPipeline
from .reader import ERROR_KINDS, resolve_sources


class StreamDataset(IterableDataset):
    """An endless (``resampled``) or one-epoch (``exact``) stream of batches for one task on one rank.

    Each batch's ``meta["resume"]`` is its worker's place after it (pipeline.py); ``resume`` continues
    from such places: ``{"next_worker": w, "workers": {w: {"snapshot": ..., "taken": n}}}``. The
    DataLoader takes batches from its workers in turn, so loader worker i plays worker
    ``(i + next_worker) % num_workers``: the first batch then comes from the worker that was next.
    """

    def __init__(self, sources: Sequence[str | Path], task: str, config: LoaderConfig, *, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, resume: dict | None = None):
        check_task(task)
        self.shards = resolve_sources(sources)
        self.manifest: Manifest = self.shards[0].manifest
        self.task, self.config, self.rank, self.world_size, self.epoch = task, config, rank, world_size, epoch
        self.resume = resume or {}

    def check_model(self, *, img_dim: int, img_label_dim: int, vocab_size: int, img_pos_dim: int = 7) -> None:
        check_compatible(self.manifest, source=self.shards[0].origin, img_dim=img_dim,
                         img_pos_dim=img_pos_dim, img_label_dim=img_label_dim, vocab_size=vocab_size,
                         need_soft_labels=self.task in SOFT_LABEL_TASKS)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[UniterBatch]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (loader_worker + self.resume.get("next_worker", 0)) % num_workers
        global_worker = self.rank * num_workers + worker
        cfg = self.config
        pipeline = WorkerPipeline(self.shards, self.task, cfg, epoch=self.epoch, global_worker=global_worker,
                                  num_global_workers=self.world_size * num_workers)
        saved = self.resume.get("workers", {}).get(worker)
        if saved is not None:
            pipeline.restore(saved["snapshot"], saved["taken"])
        stats, transform = pipeline.stats, pipeline.transform

        def counted(batch: UniterBatch) -> UniterBatch:
            batch.meta["worker"] = worker
            batch.meta["reader"] = stats.as_dict() | {"itm_forced_positives": transform.forced_positives}
            return batch

        # Each batch leaves with the counts of everything read before the next one was made, so the
        # last one carries the worker's final counts (shards skipped after its last batch included).
        held = None
        for group, place in pipeline.groups():
            if held is not None:
                yield counted(held)
            held = collate(group, self.task, cfg.pad_to_multiple_of, cfg.row_len,
                           cfg.token_budget // cfg.pack_row_len if cfg.batching == "rows" else None)
            held.meta["resume"] = place
        if held is not None:
            yield counted(held)
        elif saved is None and (stats.skipped_images or stats.corrupt_shards):  # nothing else would carry them
            raise DataError(f"{self.task} loader, worker {global_worker} of rank {self.rank}: not one usable sample "
                            f"in its shards ({stats.corrupt_shards} corrupt, {stats.lost_images} images lost, "
                            f"{stats.skipped_images} samples skipped); last errors: {stats.last_errors}")


# The reader's counts a training run reports (data/<name>), and its error kinds (data/errors/<kind>).
ATTRITION = ("images", "pairs", "skipped_images", "corrupt_shards", "lost_images", "dropped_long_captions",
             *(f"errors/{kind}" for kind in ERROR_KINDS))


class LoaderStats:
    """What a loader's consumer knows of its workers: reader counts summed over them (each batch carries
    its worker's running counts), and where each stands after the batches taken, to resume from."""

    def __init__(self, num_workers: int = 0, resume: dict | None = None) -> None:
        resume = resume or {}
        self.num_workers = max(1, num_workers)
        self.per_worker: dict[int, dict] = dict(resume.get("reader", {}))
        self.places: dict[int, dict] = {w: dict(p) for w, p in resume.get("workers", {}).items()}
        self.next_worker = resume.get("next_worker", 0)
        self.batches = 0
        self.real_tokens = 0
        self.padded_tokens = 0

    def update(self, batch: UniterBatch) -> None:
        meta = batch.meta or {}
        worker = meta.get("worker", 0)
        self.per_worker[worker] = meta.get("reader", {})
        self.batches += 1
        self.real_tokens += meta.get("real_tokens", 0)
        self.padded_tokens += meta.get("padded_tokens", 0)
        place = meta.get("resume")
        if place is None:
            return
        if "snapshot" in place:
            self.places[worker] = {"snapshot": place["snapshot"], "taken": place["taken"]}
        elif self.places.get(worker, {}).get("snapshot", {}).get("id") == place["id"]:
            self.places[worker]["taken"] = place["taken"]
        else:  # a consumer that skipped batches (a benchmark's warm-up) counts, but cannot resume
            self.places[worker] = {"missed_snapshot": place["id"]}
        self.next_worker = (worker + 1) % self.num_workers

    def resume_state(self) -> dict:
        """``StreamDataset(resume=...)`` continues after the batches taken so far."""
        missed = {w: p["missed_snapshot"] for w, p in self.places.items() if "missed_snapshot" in p}
        if missed:
            raise RuntimeError(f"loader workers {sorted(missed)}: batches carrying their snapshots {missed} did not "
                               f"pass through update(), so where they stand is not known")
        return {"next_worker": self.next_worker, "workers": {w: dict(p) for w, p in self.places.items()},
                "reader": dict(self.per_worker)}

    def totals(self) -> dict:
        out: dict = {"batches": self.batches, "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
                     "padding_fraction": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0}
        errors: dict[str, int] = {}
        for counts in self.per_worker.values():
            for key, value in counts.items():
                if key == "errors":
                    for kind, n in value.items():
                        errors[kind] = errors.get(kind, 0) + n
                elif isinstance(value, int):
                    out[key] = out.get(key, 0) + value
        out["errors"] = errors
        out |= {f"errors/{kind}": n for kind, n in errors.items()}
        return out

    def last_errors(self) -> list[str]:
        return [line for counts in self.per_worker.values() for line in counts.get("last_errors", [])]


def die_with_parent(_worker_id: int = 0) -> None:
    """Linux: this process gets SIGKILL when its parent dies. A loader worker's parent is the fork server,
    whose own parent is the rank (forkserver_preload.py): nothing outlives a rank killed with -9."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def forkserver_preload() -> list[str]:
    """What the loaders' fork server imports once, so that each worker forked from it starts at once.

    Every worker re-runs the process's main module first (multiprocessing's ``prepare``): under the
    launcher that is ``uniter_ds.train.pretrain``, whose imports (DeepSpeed, transformers, MLflow) took
    ~4 s per worker on the 2-core machine, paid again by every stream's first batch and every exact
    epoch's new loader while the training step waited. Preloaded here, a worker's re-run finds them
    imported. Only a main module of this package is preloaded: they import without side effects, a
    user's script may not."""
    preload = ["uniter_ds.data.loader", "uniter_ds.data.forkserver_preload"]
    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if main and main.startswith("uniter_ds.") and main not in preload:
        preload.append(main)
    return preload


def build_loader(sources: Sequence[str | Path], task: str, config: LoaderConfig, *, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, resume: dict | None = None) -> DataLoader:
    dataset = StreamDataset(sources, task, config, rank=rank, world_size=world_size, epoch=epoch, resume=resume)
    # Its own generator: starting the workers must not draw from the global torch RNG, or when a
    # loader is opened would change the training run's dropout masks (and break exact resume).
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1009 + rank * 31 + TASKS.index(task))
    context = None
    if config.num_workers > 0:
        # Workers come from a fork server, not from forking the training process: that process runs
        # threads (gloo, NCCL, MLflow) by the time a loader opens, and a fork taken while one of them
        # holds a lock deadlocks the child (seen here: a worker stuck inside fork, the job hung).
        multiprocessing.set_forkserver_preload(forkserver_preload())
        context = multiprocessing.get_context("forkserver")
    return DataLoader(
        dataset, batch_size=None, num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False, prefetch_factor=4 if config.num_workers > 0 else None, generator=generator,
        multiprocessing_context=context, worker_init_fn=die_with_parent if config.num_workers > 0 else None,
    )


__all__ = ["ATTRITION", "DataError", "LoaderConfig", "LoaderStats", "StreamDataset", "build_loader"]
