"""The training data feed: one loader per (dataset, task) stream, its place for checkpoints and resume,
and the reader's counts reduced over ranks, which stop a run that skips or loses too much data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import DataError, LoaderConfig, build_loader, resolve_sources
from ..data.loader import ATTRITION, LoaderStats
from ..data.reader import Shard
from ..model.inputs import UniterBatch
from .config import ExperimentConfig
from .scheduler import Stream

logger = logging.getLogger("uniter_ds.pretrain")

# What a checkpoint saved before these keys existed was trained with (the defaults of the time).
SAVED_BEFORE_THE_KEY_EXISTED = {"data.batching": "budget", "data.pool_budgets": 16, "data.min_pool_tokens": 2**18,
                                "data.mask_prob": 0.15, "data.itm_neg_prob": 0.5}


class DataFeed:
    """One loader per stream, with its place (epoch, batches used, where each loader worker stands) and
    its reader counts, for checkpoints.

    Resume ``exact`` (default): each loader worker is restored from its saved place (the images it
    held are read again, nothing else: the same cost at any step) and the run continues on exactly the
    batches it would have seen. ``replay``: the loaders are rebuilt with the same seeds and the used
    batches read again and dropped (exact too, but the cost grows with the step; what a checkpoint
    without worker places falls back to). ``reseed``: each stream continues with the next epoch's seed
    (the data order then differs from an uninterrupted run; for a changed loader setup).

    Counts (images read, skipped, lost in corrupt shards, ...) ride on the batches from the loader
    workers; those of loaders already closed (earlier epochs) are kept in ``earlier``."""

    def __init__(self, config: ExperimentConfig, streams: list[Stream], rank: int, world_size: int,
                 state: dict[str, Any] | None = None, shards: dict[str, list[Shard]] | None = None):
        """``shards``: each training dataset's shards, resolved once at the job's start (else resolved here)."""
        self.config, self.rank, self.world_size = config, rank, world_size
        data = config.data
        self.loader_config = LoaderConfig.of(data, seed=config.seed)
        self.paths = {d.name: d.paths for d in data.train}
        self.shards = shards or {d.name: resolve_sources(d.paths) for d in data.train}
        self.position = {s.name: {"epoch": 0, "batches": 0} for s in streams}
        self.streams = {s.name: s for s in streams}
        self.iterators: dict[str, Iterator[UniterBatch]] = {}
        self.stats: dict[str, LoaderStats] = {}
        self.earlier = dict.fromkeys(ATTRITION, 0)
        self._reported: set[str] = set()
        state = state or {}
        positions = state.get("positions", state if "counts" not in state else {})  # older checkpoints: positions
        counts = state.get("counts", {})
        self.earlier |= counts.get("total" if data.resume == "reseed" else "earlier", {})
        if data.resume == "exact" and "loader" in state:
            self._check_same_setup(state["loader"])
        for name, where in positions.items():
            if name not in self.position:
                continue  # a stream the new config no longer trains on
            if data.resume == "reseed":
                self.position[name] = {"epoch": where["epoch"] + 1, "batches": 0}
                continue
            self.position[name] = {"epoch": where["epoch"], "batches": where["batches"]}
            if data.resume == "exact" and ("workers" in where or not where["batches"]):
                self._open(name, where.get("workers"))
            else:
                if data.resume == "exact":
                    logger.warning("data.resume exact: rank %d's checkpoint state has no loader worker places for "
                                   "%s (saved by an older version, or its rank file is gone); replaying its %d "
                                   "batches instead", rank, name, where["batches"])
                iterator = self._open(name)
                for _ in range(where["batches"]):
                    self.stats[name].update(next(iterator))

    def _setup(self) -> dict[str, Any]:
        """What the loader workers' places are only valid under."""
        cfg = self.loader_config
        return {"world_size": self.world_size, "data.num_workers": cfg.num_workers, "data.split": cfg.split,
                "seed": cfg.seed, "data.token_budget": cfg.token_budget, "data.shuffle_buffer": cfg.shuffle_buffer,
                "data.max_text_len": cfg.max_text_len, "data.masking": cfg.masking,
                "data.pad_to_multiple_of": cfg.pad_to_multiple_of, "data.pack_row_len (packed)": cfg.row_len,
                "data.batching": cfg.batching, "data.pool_budgets": cfg.pool_budgets,
                "data.min_pool_tokens": cfg.min_pool_tokens, "data.mask_prob": cfg.mask_prob,
                "data.itm_neg_prob": cfg.itm_neg_prob,
                "data.train paths": {name: list(map(str, paths)) for name, paths in self.paths.items()}}

    def _check_same_setup(self, saved: dict[str, Any]) -> None:
        now = self._setup()
        saved = SAVED_BEFORE_THE_KEY_EXISTED | saved
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in now.items() if saved.get(key) != value]
        if changed:
            raise DataError(f"data.resume exact continues each loader worker where it stood, which needs the data "
                            f"setup the checkpoint was saved with; changed: {'; '.join(changed)}. Restore those "
                            f"settings, or set data.resume: reseed to go on with fresh data streams")

    def _open(self, name: str, resume: dict[str, Any] | None = None) -> Iterator[UniterBatch]:
        if name in self.stats:  # an epoch's loader is done: keep its counts
            totals = self.stats[name].totals()
            self.earlier = {k: self.earlier[k] + totals.get(k, 0) for k in ATTRITION}
        self.stats[name] = LoaderStats(self.loader_config.num_workers, resume)
        stream = self.streams[name]
        loader = build_loader(self.shards[stream.dataset], stream.task, self.loader_config, rank=self.rank,
                              world_size=self.world_size, epoch=self.position[name]["epoch"], resume=resume)
        self.iterators[name] = iter(loader)
        return self.iterators[name]

    def next(self, stream: Stream) -> UniterBatch:
        name = stream.name
        iterator = self.iterators[name] if name in self.iterators else self._open(name)
        try:
            batch = next(iterator)
        except StopIteration:  # an exact-split epoch is over: the next one, reshuffled
            self.position[name] = {"epoch": self.position[name]["epoch"] + 1, "batches": 0}
            batch = next(self._open(name))
        self.position[name]["batches"] += 1
        self.stats[name].update(batch)
        return batch

    def counts(self) -> dict[str, int]:
        """This rank's reader counts over the whole run so far."""
        current = [stats.totals() for stats in self.stats.values()]
        return {k: self.earlier[k] + sum(t.get(k, 0) for t in current) for k in ATTRITION}

    def new_errors(self) -> list[str]:
        """The reader errors (skipped samples, corrupt shards) not reported yet, as their messages."""
        fresh = [line for stats in self.stats.values() for line in stats.last_errors() if line not in self._reported]
        self._reported.update(fresh)
        return fresh

    def state_dict(self, workers: bool = True) -> dict[str, Any]:
        """This rank's place in every stream; ``workers``: with each loader worker's place (exact resume)."""
        positions = {name: dict(where) for name, where in self.position.items()}
        if workers:
            for name, stats in self.stats.items():
                positions[name]["workers"] = stats.resume_state()
        return {"positions": positions, "counts": {"earlier": dict(self.earlier), "total": self.counts()},
                "loader": self._setup()}


MIN_IMAGES_FOR_SKIP_CHECK = 1000  # below this, one bad shard read first is too large a share to judge by


def data_metrics(feed: DataFeed, comm_device: torch.device) -> dict[str, float]:
    """The run's reader counts over all ranks (``data/...``); each rank logs its own new reader errors."""
    for line in feed.new_errors():
        logger.warning("data: %s", line)
    local = feed.counts()
    counts = torch.tensor([local[k] for k in ATTRITION], dtype=torch.float64, device=comm_device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    totals = dict(zip(ATTRITION, counts.cpu().tolist()))
    wanted = totals["images"] + totals["skipped_images"] + totals["lost_images"]
    metrics = {f"data/{k}": v for k, v in totals.items()}
    metrics["data/skip_fraction"] = (totals["skipped_images"] + totals["lost_images"]) / wanted if wanted else 0.0
    return metrics


def stop_on_faults(metrics: dict[str, float], config: ExperimentConfig, first: int, last: int, final: bool,
                   checkpoint: Path | None) -> None:
    """Stop the run (on every rank alike: the numbers are reduced over ranks) when a step's loss was NaN or
    inf, or when more of the data was skipped or lost than ``data.max_skip_fraction`` allows."""
    since = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
    if metrics["train/nonfinite_losses"]:
        streams = [k.removeprefix("train/").removesuffix("/nonfinite_losses") for k in metrics
                   if k.endswith("/nonfinite_losses") and k != "train/nonfinite_losses"]
        raise FloatingPointError(
            f"non-finite loss in {metrics['train/nonfinite_losses']:.0f} micro-batch(es) of {streams} in steps "
            f"{first}-{last} (rank*.jsonl lists each step's pairs); the weights may be NaN from there on, so "
            f"the run stops: {since}. Reader-side NaN/inf features are skipped (data.on_error: skip) or named "
            f"(raise) before they reach the model, so this comes from the model (learning rate, precision)")
    wanted = metrics["data/images"] + metrics["data/skipped_images"] + metrics["data/lost_images"]
    if metrics["data/skip_fraction"] > config.data.max_skip_fraction and (final or wanted >= MIN_IMAGES_FOR_SKIP_CHECK):
        raise DataError(
            f"data: {metrics['data/skipped_images']:.0f} images skipped and {metrics['data/lost_images']:.0f} lost "
            f"in {metrics['data/corrupt_shards']:.0f} corrupt shard(s) of {wanted:.0f} = "
            f"{metrics['data/skip_fraction']:.1%} by step {last}, over data.max_skip_fraction "
            f"({config.data.max_skip_fraction:.1%}); the warnings above name them; {since}")
