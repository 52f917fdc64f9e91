"""UNITER pretraining with DeepSpeed: the entry point the ``deepspeed`` launcher starts on every rank.

    deepspeed --num_gpus 8 --module uniter_ds.train.pretrain --config launch/uniter-base.yaml
    uniter-ds pretrain --config launch/uniter-base.yaml --num-gpus 8      # validates, then the same

One (dataset, task) stream per optimizer step (or per micro-batch), drawn identically on every rank;
each stream has its own loader. The loss of a step is, per task, the mean over every item (masked
token, masked region or pair) of every micro-batch on every rank; see ``train_step``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import yaml
from deepspeed.accelerator import get_accelerator

from .. import run_layout
from ..data import DataError, LoaderConfig, build_loader, check_compatible, resolve_sources
from ..data.loader import ATTRITION, LoaderStats
from ..model import (
    LoadReport,
    UniterForPretraining,
    load_bert_weights,
    load_original_state_dict,
)
from ..model.inputs import UniterBatch
from ..model.kernels import active_kernels
from ..model.tasks import ACCURACY_TASKS, needs_soft_labels
from ..provenance import device_name, git_commit, git_dirty, package_versions
from . import checkpointing
from .config import ExperimentConfig, check_with_deepspeed, load_config
from .distributed import init_distributed, say_while_waiting
from .evaluate import evaluate
from .extensions import extensions_dir
from .scheduler import Stream, TaskScheduler
from .tracking import Tracker, keep_steps_up_to

logger = logging.getLogger("uniter_ds.pretrain")


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def build_model(config: ExperimentConfig) -> UniterForPretraining:
    section = config.model
    model = UniterForPretraining(section.uniter_config(), wra_weight=section.wra_weight, mrc_kl=section.mrc_kl)
    model.uniter.encoder.activation_checkpointing = section.activation_checkpointing
    model.uniter.encoder.packed_attention = section.packed_attention
    if section.compile:
        model.compile_for_training()
    if section.cuda_graphs:
        model.uniter.encoder.use_cuda_graphs()
    if section.init_from:
        kind, path = section.init_from.split(":", 1)
        if kind == "bert":
            report = load_bert_weights(model, path)
        elif kind == "uniter":
            report = load_original_state_dict(model, torch.load(path, map_location="cpu", weights_only=True),
                                              strict=False)
        else:
            loaded, info = UniterForPretraining.from_pretrained(
                path, wra_weight=section.wra_weight, mrc_kl=section.mrc_kl, output_loading_info=True)
            model.load_state_dict(loaded.state_dict())
            # An encoder export has no heads: they start from BERT's initialisation, and the log says so.
            report = LoadReport(missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]))
        if report is not None and is_rank0():
            logger.info("initialised from %s\n%s", section.init_from, report)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and embeddings; none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.split(".")[-2] else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("torch", "deepspeed")


def optimizer_config(lr: float, betas: list[float], eps: float, weight_decay: float, on_gpu: bool,
                     implementation: str = "torch") -> dict[str, Any]:
    """AdamW for DeepSpeed's ``optimizer`` section.

    ``torch``: torch.optim.AdamW with its fused kernel (CUDA and CPU): one pass per parameter tensor
    instead of ~8 elementwise ops, and nothing to compile at start. ``deepspeed``: DeepSpeed's
    FusedAdam, a CUDA extension that nvcc builds the first time a process needs it (about a minute,
    and a process killed during that build leaves a lock behind that makes every later one wait;
    ``uniter-ds prebuild`` builds it ahead, train/extensions.py). Both compute the same AdamW step."""
    if implementation not in OPTIMIZERS:
        raise ValueError(f"optimizer implementation {implementation!r}: expected one of {', '.join(OPTIMIZERS)}")
    if implementation == "deepspeed" and not on_gpu:
        raise ValueError("optimizer implementation 'deepspeed' (FusedAdam) needs a CUDA device; use 'torch' on CPU")
    params: dict[str, Any] = {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                              "torch_adam": implementation == "torch", "adam_w_mode": True}
    if implementation == "torch":
        params["fused"] = True
    return {"type": "AdamW", "params": params}


def deepspeed_config(config: ExperimentConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed file (ZeRO stage, precision, ...) plus what the experiment config owns."""
    path = Path(config.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    optim = config.optim
    managed = {
        # Micro-batches are sized in tokens, not samples; DeepSpeed's sample count is nominal.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": optimizer_config(optim.lr, list(optim.betas), optim.eps, optim.weight_decay, on_gpu,
                                      optim.implementation),
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": max(1, optim.warmup_steps),
            "total_num_steps": optim.total_steps, "warmup_type": "linear"}},
        "steps_per_print": 10**9,
    }
    check_with_deepspeed(config, ds, path)
    for key, value in managed.items():
        if key in ds and ds[key] != value and is_rank0():
            logger.warning("%s: %s is set by the experiment config (%s), not by this file", path, key, value)
    return ds | managed


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def num_items(batch: UniterBatch, task: str) -> int:
    if task == "mlm":
        return batch.mlm_labels.numel()
    if task == "itm":
        return batch.batch_size
    return batch.mrm_positions.numel()


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
                 state: dict[str, Any] | None = None):
        self.config, self.rank, self.world_size = config, rank, world_size
        data = config.data
        self.loader_config = LoaderConfig(
            token_budget=data.token_budget, split=data.split, seed=config.seed, shuffle_buffer=data.shuffle_buffer,
            max_text_len=data.max_text_len, on_error=data.on_error, num_workers=data.num_workers,
            masking=data.masking, pad_to_multiple_of=data.pad_to_multiple_of, cache_dir=data.cache_dir,
            pack_row_len=data.pack_row_len if data.layout == "packed" else None, batching=data.batching)
        self.paths = {d.name: d.paths for d in data.train}
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
                "data.pad_to_multiple_of": cfg.pad_to_multiple_of, "data.pack_row_len (packed)": cfg.pack_row_len,
                "data.batching": cfg.batching,
                "data.train paths": {name: list(map(str, paths)) for name, paths in self.paths.items()}}

    def _check_same_setup(self, saved: dict[str, Any]) -> None:
        now = self._setup()
        saved = {"data.batching": "budget"} | saved  # saved before that key existed
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
        loader = build_loader(self.paths[stream.dataset], stream.task, self.loader_config, rank=self.rank,
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


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: a copy from pageable memory into a GPU
    is synchronous, one from pinned memory is not (the host allocator keeps the buffer until it is done)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def new_window(names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-stream sums between two log steps, on the device: item losses, items, correct predictions and
    micro-batches whose loss was NaN or inf (``train_step`` adds, ``reduce_window`` reads and clears)."""
    return {k: torch.zeros(len(names), dtype=torch.float64, device=device)
            for k in ("loss", "items", "correct", "nonfinite")}


def train_step(engine, batches: list[UniterBatch], streams: list[Stream], device: torch.device,
               comm_device: torch.device, window: dict[str, torch.Tensor], names: list[str]) -> None:
    """Forward/backward over the step's micro-batches; DeepSpeed steps the optimizer at the end.

    Objective of the step: sum over streams s of (m_s / A) * (sum of s's item losses over all ranks
    and micro-batches) / G_s, with A micro-batches per rank, m_s of them from stream s, G_s the items
    of s in the whole step. DeepSpeed divides each micro-batch loss by A and averages gradients over
    the W ranks, so micro-batch k of stream s backpropagates sum(item losses) * W * m_s / G_s. The
    result does not depend on how the step's micro-batches are spread over ranks and accumulation.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    counts = torch.zeros(len(names), dtype=torch.float64)
    micro_per_stream = torch.zeros(len(names), dtype=torch.float64)
    for batch, stream in zip(batches, streams):
        index = names.index(stream.name)
        counts[index] += num_items(batch, stream.task)
        micro_per_stream[index] += 1
    counts = to_device(counts, comm_device)
    if dist.is_initialized():
        dist.all_reduce(counts)  # one small collective per step: every stream's items in the whole step
    scale = to_device(world * micro_per_stream, comm_device) / counts.clamp(min=1)
    scale = scale.to(device, non_blocking=True)
    for batch, stream in zip(batches, streams):
        index = names.index(stream.name)
        if device.type == "cuda" and batch.input_ids.device.type == "cpu" and not batch.input_ids.is_pinned():
            batch = batch.pin_memory()  # the loader pins its batches; a batch from elsewhere is pinned here
        out = engine(batch.to(device, non_blocking=True), stream.task)
        item_sum = out.item_losses.sum()
        engine.backward(item_sum * scale[index].to(item_sum.dtype))
        engine.step()
        # Window sums stay on the device: nothing here waits for the host.
        window["loss"][index] += item_sum.detach().double()
        window["items"][index] += out.num_items
        window["nonfinite"][index] += (~torch.isfinite(item_sum.detach())).double()
        if out.num_correct is not None:
            window["correct"][index] += out.num_correct.double()


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


def reduce_window(window: dict[str, torch.Tensor], names: list[str], comm_device: torch.device) -> dict[str, float]:
    stacked = torch.stack([window["loss"], window["items"], window["correct"], window["nonfinite"]]).to(comm_device)
    if dist.is_initialized():
        dist.all_reduce(stacked)
    loss, items, correct, nonfinite = stacked.cpu().tolist()
    metrics: dict[str, float] = {"train/nonfinite_losses": sum(nonfinite)}
    metrics |= {f"train/{name}/nonfinite_losses": n for name, n in zip(names, nonfinite) if n}
    by_task: dict[str, list[float]] = {}
    for name, total, count, hits in zip(names, loss, items, correct):
        if count:
            task = name.split("/", 1)[1]
            metrics[f"train/{name}/loss"] = total / count
            agg = by_task.setdefault(task, [0.0, 0.0, 0.0])
            agg[0] += total
            agg[1] += count
            agg[2] += hits
    for task, (total, count, hits) in by_task.items():
        metrics[f"train/{task}/loss"] = total / count
        if task in ACCURACY_TASKS:
            metrics[f"train/{task}/acc"] = hits / count
    for value in window.values():
        value.zero_()
    return metrics


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(config: ExperimentConfig, resume: str | None = None) -> dict[str, Any]:
    rank, world, device = init_distributed()  # this rank's GPU is selected before anything is built
    on_gpu = device.type == "cuda"
    comm_device = device if get_accelerator().communication_backend_name() == "nccl" else torch.device("cpu")
    run_dir = Path(config.run_dir)
    busy = [None]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            run_lock = run_layout.lock_run_directory(run_dir)  # noqa: F841 -- held until this process ends
        except run_layout.RunDirectoryBusy as error:
            busy = [str(error)]
        else:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(busy, src=0)
    if busy[0]:  # every rank stops alike
        raise run_layout.RunDirectoryBusy(busy[0])
    dist.barrier()

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config)
    streams = [Stream(d.name, task) for d in config.data.train for task in d.tasks]
    names = [s.name for s in streams]
    train_shards = {d.name: resolve_sources(d.paths) for d in config.data.train}
    for dataset in config.data.train:  # refuse data that does not fit the model, before any step
        check_compatible(train_shards[dataset.name][0].manifest, source=dataset.name,
                         img_dim=model.config.img_dim, img_pos_dim=model.config.img_pos_dim,
                         img_label_dim=model.config.img_label_dim, vocab_size=model.config.vocab_size,
                         need_soft_labels=needs_soft_labels(dataset.tasks))
    scheduler = TaskScheduler({s: d.tasks[s.task] for d in config.data.train for s in streams
                               if s.dataset == d.name}, seed=config.seed,
                              per_micro_batch=config.task_draw == "micro_batch")
    ds_config = deepspeed_config(config, world, on_gpu)
    with say_while_waiting(f"DeepSpeed to set up the engine, which loads or builds its ops in {extensions_dir()} "
                           f"(a build takes ~1 min; a `lock` there that no process holds makes it wait forever: "
                           f"`uniter-ds prebuild` names it)"):
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                               model_parameters=param_groups(model, config.optim.weight_decay))
    zero_stage = engine.zero_optimization_stage()
    torch.manual_seed(config.seed + 1000 * rank)  # dropout streams differ per rank

    start_step, data_state = 0, None
    resume_clock: dict[str, float] = {}  # a resumed run: how long until its first new step is done
    checkpoint_root = run_dir / "checkpoints"
    if resume not in (None, "latest") and not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume}: does not exist")
    if resume is not None:
        point = checkpointing.find_resume_point(checkpoint_root if resume == "latest" else Path(resume))
        if point is None:
            if rank == 0:
                logger.info("no complete checkpoint under %s: starting from step 0", checkpoint_root)
        else:
            resume_clock = {"began": time.perf_counter()}
            client = checkpointing.load(engine, point)
            scheduler.check_state(client["scheduler"])
            start_step, data_state = client["step"], client.get("rank", {}).get("data", client["data"])
            if rank == 0:
                logger.info("resumed from %s at step %d", point, start_step)
    elif rank == 0 and (earlier := checkpointing.complete_checkpoints(checkpoint_root)):
        logger.warning("starting from step 0 in %s, which holds an earlier run's checkpoints (%s): this run's "
                       "checkpoints replace them under checkpoint.keep_last; --resume continues that run instead",
                       run_dir, ", ".join(p.name for p in earlier))
    if resume_clock:
        resume_clock["loaded"] = time.perf_counter()
    feed = DataFeed(config, streams, rank, world, data_state)

    tracker = Tracker(run_dir, enabled=rank == 0, use_mlflow=config.tracking.mlflow,
                      experiment=config.tracking.experiment, tracking_uri=config.tracking.tracking_uri,
                      run_name=run_dir.name, system_metrics_interval=config.tracking.system_metrics_interval or None,
                      resume_step=start_step if data_state is not None else None)
    tracker.log_params(config.flat() | {"world_size": str(world), "zero_stage": str(zero_stage),
                                        "kernels": json.dumps(active_kernels(model))})
    if rank == 0:
        tracker.set_tags(run_tags(device, world))
        val_shards = resolve_sources(config.data.val) if config.data.val else []
        for context, shards in [*(("train", s) for s in train_shards.values()), ("validation", val_shards)]:
            for origin in dict.fromkeys(shard.origin for shard in shards):
                tracker.log_dataset(origin, context)
        tracker.log_artifacts(run_dir / "config.yaml", "config")
        tracker.log_artifacts(Path(config.deepspeed_config), "config")

    try:
        last_step = min(config.optim.total_steps, config.stop_at_step or config.optim.total_steps)
        window = new_window(names, device)
        data_totals: dict[str, float] = {}
        progress = None
        if rank == 0 and config.tracking.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=last_step, initial=start_step, desc="pretrain", dynamic_ncols=True)
        if data_state is not None:  # resumed: the steps after the checkpoint are logged again
            keep_steps_up_to(run_dir / f"rank{rank}.jsonl", start_step)
        # Line-buffered: a rank killed mid-run keeps every step it logged (a block buffer lost the last ones).
        rank_log = open(run_dir / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115 - open for the whole run
        window_start, window_samples, window_tokens, window_padded = time.perf_counter(), 0, 0, 0
        window_first_step = start_step + 1
        val_tasks = sorted({s.task for s in streams})
        checkpoint = None
        eval_metrics: dict[str, float] = {}
        engine.train()

        def run_eval(step: int) -> dict[str, float]:
            if not config.data.val:
                return {}
            engine.eval()
            metrics = evaluate(lambda b, t: engine(b, t), config.data.val, val_tasks, batches=config.eval.batches,
                               retrieval_images=config.eval.retrieval_images, token_budget=config.data.token_budget,
                               max_text_len=config.data.max_text_len, device=device)
            engine.train()
            tracker.log_metrics(metrics, step)
            if rank == 0:
                logger.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
            return metrics

        def save(step: int) -> Path:
            client = {"step": step, "scheduler": scheduler.state_dict(), "data": feed.state_dict(workers=False),
                      "config": config.to_dict()}
            return checkpointing.save(engine, checkpoint_root, step, client, config.checkpoint.keep_last,
                                      rank_state={"data": feed.state_dict()})

        for step in range(start_step, last_step):
            step_streams = scheduler.for_step(step, config.optim.grad_accum)
            batches = [feed.next(s) for s in step_streams]
            train_step(engine, batches, step_streams, device, comm_device, window, names)
            if resume_clock and "first_step" not in resume_clock:
                resume_clock["first_step"] = time.perf_counter()
                if rank == 0:
                    logger.info("resumed: step %d done %.1f s after the checkpoint began to load (%.1f s loading "
                                "it, %.1f s restoring the data streams and making the step)", step + 1,
                                resume_clock["first_step"] - resume_clock["began"],
                                resume_clock["loaded"] - resume_clock["began"],
                                resume_clock["first_step"] - resume_clock["loaded"])
            done = step + 1
            samples = sum(b.batch_size for b in batches)
            tokens = sum(b.meta["real_tokens"] for b in batches)
            window_samples, window_tokens = window_samples + samples, window_tokens + tokens
            window_padded += sum(b.meta["padded_tokens"] for b in batches)  # what the encoder ran
            rank_log.write(json.dumps({"step": done, "streams": [s.name for s in step_streams],
                                       "pairs": [b.meta["pairs"] for b in batches]}) + "\n")
            if done % config.tracking.log_every == 0 or done == last_step:
                metrics = reduce_window(window, names, comm_device)
                elapsed = time.perf_counter() - window_start
                totals = torch.tensor([window_samples, window_tokens, window_padded], dtype=torch.float64,
                                      device=comm_device)
                dist.all_reduce(totals)
                grad_norm = engine.get_global_grad_norm()
                metrics |= {"lr": engine.get_lr()[0], "loss": _window_loss(metrics),
                            "samples_per_s": float(totals[0]) / elapsed, "tokens_per_s": float(totals[1]) / elapsed,
                            "samples_per_s_per_rank": float(totals[0]) / elapsed / world,
                            "padding_fraction": 1 - float(totals[1]) / max(float(totals[2]), 1.0)}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                data_totals = data_metrics(feed, comm_device)
                metrics |= data_totals
                if getattr(engine, "skipped_steps", 0):  # fp16: steps DeepSpeed's loss scaler skipped on overflow
                    metrics["train/overflow_skipped_steps"] = float(engine.skipped_steps)
                optimizer = engine.optimizer
                loss_scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
                if isinstance(loss_scale, (int, float)):
                    metrics["loss_scale"] = float(loss_scale)
                tracker.log_metrics(metrics, done)
                stop_on_faults(metrics, config, window_first_step, done, done == last_step, checkpoint)
                window_start, window_samples, window_tokens, window_padded = time.perf_counter(), 0, 0, 0
                window_first_step = done + 1
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.1f}")
                elif rank == 0:
                    eta = (last_step - done) * elapsed / config.tracking.log_every
                    logger.info("step %d/%d loss %.4f lr %.3g %.1f samples/s eta %.0fs", done, last_step,
                                metrics["loss"], metrics["lr"], metrics["samples_per_s"], eta)
            if progress is not None:
                progress.update(1)
            if config.eval.every and done % config.eval.every == 0 and done < last_step:
                eval_metrics = run_eval(done)
            if config.checkpoint.every and done % config.checkpoint.every == 0 and done < last_step:
                checkpoint = save(done)
        rank_log.close()
        if progress is not None:
            progress.close()

        export: Path | None = None
        if last_step > start_step:
            if config.eval.at_end:
                eval_metrics = run_eval(last_step)
            if config.checkpoint.at_end or config.export_at_end:
                checkpoint = save(last_step)
            if config.export_at_end and rank == 0:
                # The same path as `uniter-ds export`: consolidated fp32 weights, verified by reloading.
                from ..export import export as export_weights

                export = Path(export_weights(checkpoint, run_dir / "export", heads=True, overwrite=True)["out"])
                tracker.log_artifacts(export, "export")
        elif rank == 0:
            logger.info("nothing to train: the run is already at step %d", start_step)
        dist.barrier()
        tracker.finish()
    except BaseException as error:  # the MLflow run must not stay RUNNING after a crash or Ctrl-C
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    result = {"run_dir": str(run_dir), "last_step": last_step, "eval": eval_metrics,
              "checkpoint": str(checkpoint) if checkpoint else None, "export": str(export) if export else None,
              "mlflow": tracker.tracking_uri, "mlflow_run_id": tracker.run_id, "tracking": tracker.stats,
              "data": {k.removeprefix("data/"): v for k, v in data_totals.items()}}
    if "first_step" in resume_clock:
        result["resume"] = {"from_step": start_step, "data_resume": config.data.resume,
                            "seconds_to_first_step": resume_clock["first_step"] - resume_clock["began"],
                            "seconds_loading_checkpoint": resume_clock["loaded"] - resume_clock["began"]}
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_eval(metrics: dict[str, float]) -> str:
    """``val/itm/acc=0.9120 (0.50)``: each accuracy and recall beside its chance level."""
    def chance(name: str) -> float | None:
        if name.endswith("/acc"):
            return metrics.get(name + "_chance")
        if name.startswith("val/retrieval/"):
            return metrics.get("val/retrieval/r" + name.rsplit("_r", 1)[1] + "_chance")
        return None

    parts = []
    for name, value in sorted(metrics.items()):
        if name.endswith("_chance"):
            continue
        level = chance(name)
        parts.append(f"{name}={value:.4f}" + (f" ({level:.2f})" if level is not None else ""))
    return ", ".join(parts)


def run_tags(device: torch.device, world: int) -> dict[str, Any]:
    """MLflow tags: the code, the packages and the machine the run ran on."""
    versions = package_versions()
    dirty = git_dirty()
    return {"git_commit": git_commit(), "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
            "device": device_name(device), "device_type": device.type, "world_size": world,
            **{f"version.{name}": version for name, version in versions.items()}}


def _window_loss(metrics: dict[str, float]) -> float:
    """One number for the progress line: the mean of the per-task losses of the window."""
    values = [v for k, v in metrics.items() if k.startswith("train/") and k.endswith("/loss") and k.count("/") == 2]
    return sum(values) / len(values) if values else math.nan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config (YAML or JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the run's latest complete checkpoint, or from PATH")
    parser.add_argument("--deepspeed_config", help="overrides the config's deepspeed_config")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


NAMED_FAULTS = (DataError, FloatingPointError, run_layout.RunDirectoryBusy, checkpointing.DiskFull)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set) + ([f"deepspeed_config={args.deepspeed_config}"] if args.deepspeed_config else [])
    config = load_config(args.config, overrides)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = run(config, args.resume)
    except NAMED_FAULTS as error:  # their message is the report: no traceback
        logger.error("rank %s stopped: %s", os.environ.get("RANK", "0"), error)
        return 1
    if is_rank0():
        print(f"run directory: {result['run_dir']}")
        print(f"final checkpoint: {result['checkpoint']}")
        print(f"exported weights: {result['export']}")
        print(f"metrics: {Path(result['run_dir']) / 'metrics.jsonl'}; MLflow: {result['mlflow']} "
              f"(run {result['mlflow_run_id']})")
        if result["eval"]:
            print("held-out evaluation (chance in brackets): " + format_eval(result["eval"]))
        if result["data"]:
            data = result["data"]
            print(f"data: {data['images']:.0f} images read; {data['skipped_images']:.0f} skipped, "
                  f"{data['lost_images']:.0f} lost in {data['corrupt_shards']:.0f} corrupt shard(s) "
                  f"({data['skip_fraction']:.2%}); {data['dropped_long_captions']:.0f} captions over "
                  f"data.max_text_len dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
