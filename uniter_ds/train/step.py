"""One optimizer step over a step's micro-batches, and the sums of a log window (between two log steps).

The loss of a step is, per task, the mean over every item (masked token, masked region or pair) of every
micro-batch on every rank; see :func:`train_step`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist

from ..model.inputs import UniterBatch
from ..model.tasks import ACCURACY_TASKS
from .scheduler import Stream


def num_items(batch: UniterBatch, task: str) -> int:
    if task == "mlm":
        return batch.mlm_labels.numel()
    if task == "itm":
        return batch.batch_size
    return batch.mrm_positions.numel()


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


def window_loss(metrics: dict[str, float]) -> float:
    """One number for the progress line: the mean of the per-task losses of the window."""
    values = [v for k, v in metrics.items() if k.startswith("train/") and k.endswith("/loss") and k.count("/") == 2]
    return sum(values) / len(values) if values else math.nan



class LogWindow:
    """What a rank sums between two log steps: the per-stream sums on the device (:func:`new_window`) and,
    on the host, the samples, real tokens and padded tokens, and the window's wall time."""

    def __init__(self, names: list[str], device: torch.device, comm_device: torch.device, first_step: int):
        self.names, self.comm_device = names, comm_device
        self.sums = new_window(names, device)
        self.seconds = 0.0  # how long the last closed window took
        self._restart(first_step)

    def _restart(self, first_step: int) -> None:
        self.first_step, self.start = first_step, time.perf_counter()
        self.samples = self.tokens = self.padded = 0

    def add(self, batches: list[UniterBatch]) -> None:
        self.samples += sum(b.batch_size for b in batches)
        self.tokens += sum(b.meta["real_tokens"] for b in batches)
        self.padded += sum(b.meta["padded_tokens"] for b in batches)  # what the encoder ran

    def close(self, engine: Any, last_step: int) -> dict[str, float]:
        """The window's metrics over all ranks (losses, accuracies, throughput, learning rate, gradient
        norm, fp16 loss scale); the next window starts after ``last_step``."""
        metrics = reduce_window(self.sums, self.names, self.comm_device)
        elapsed = time.perf_counter() - self.start
        totals = torch.tensor([self.samples, self.tokens, self.padded], dtype=torch.float64, device=self.comm_device)
        world = 1
        if dist.is_initialized():
            dist.all_reduce(totals)
            world = dist.get_world_size()
        samples, tokens, padded = totals.tolist()
        metrics |= {"lr": engine.get_lr()[0], "loss": window_loss(metrics), "samples_per_s": samples / elapsed,
                    "tokens_per_s": tokens / elapsed, "samples_per_s_per_rank": samples / elapsed / world,
                    "padding_fraction": 1 - tokens / max(padded, 1.0)}
        if (grad_norm := engine.get_global_grad_norm()) is not None:
            metrics["grad_norm"] = float(grad_norm)
        if getattr(engine, "skipped_steps", 0):  # fp16: steps DeepSpeed's loss scaler skipped on overflow
            metrics["train/overflow_skipped_steps"] = float(engine.skipped_steps)
        optimizer = engine.optimizer
        loss_scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        if isinstance(loss_scale, (int, float)):
            metrics["loss_scale"] = float(loss_scale)
        self.seconds = elapsed
        self._restart(last_step + 1)
        return metrics
