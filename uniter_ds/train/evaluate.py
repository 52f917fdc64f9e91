"""Held-out evaluation: per-task loss and accuracy, and zero-shot image-text retrieval by ITM score.

Beside every accuracy, its chance level on the same held-out items (``.../acc_chance``: what always
answering the most frequent target scores) and beside every recall its random level
(``..._r{k}_chance`` = k / images), so a number can be read against what learning nothing gives.

Every rank runs the same evaluation on the same batches (ZeRO-3 needs every rank in each forward);
the held-out stream is read in shard order with a fixed seed, so its masks are the same at every
evaluation and numbers are comparable across a run.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import LoaderConfig, ReaderStats, StreamDataset, read_shard, resolve_sources
from ..data.reader import pairs_of
from ..model.inputs import UniterBatch, build_batch
from ..model.modeling import TaskOutput
from ..model.tasks import ACCURACY_TASKS

if TYPE_CHECKING:
    from ..data.reader import Shard
    from .config import ExperimentConfig
    from .tracking import Tracker

logger = logging.getLogger("uniter_ds.pretrain")

EVAL_SEED = 1234

Forward = Callable[[UniterBatch, str], TaskOutput]


@torch.no_grad()
def evaluate_tasks(forward: Forward, val_paths: Sequence[str | Path], tasks: Sequence[str], *, batches: int,
                   token_budget: int, max_text_len: int | None, device: torch.device) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for task in tasks:
        config = LoaderConfig(token_budget=token_budget, split="exact", seed=EVAL_SEED, shuffle_buffer=0,
                              num_workers=0, max_text_len=max_text_len)
        loss_sum, items, correct, kl_sum = 0.0, 0, 0, 0.0
        targets: Counter[int] = Counter()
        for batch in itertools.islice(StreamDataset(val_paths, task, config), batches):
            targets.update(_targets(batch, task))
            out = forward(batch.to(device), task)
            loss_sum += float(out.item_losses.sum())
            items += out.num_items
            correct += int(out.num_correct) if out.num_correct is not None else 0
            if out.parts and "kl_per_region" in out.parts:
                kl_sum += float(out.parts["kl_per_region"]) * out.num_items
        if items:
            metrics[f"val/{task}/loss"] = loss_sum / items  # the training objective
            if task == "mrc-kl":  # what the reference's validation reports
                metrics["val/mrc-kl/kl_per_region"] = kl_sum / items
            if task in ACCURACY_TASKS:
                metrics[f"val/{task}/acc"] = correct / items
                metrics[f"val/{task}/acc_chance"] = max(targets.values()) / sum(targets.values())
    return metrics


def _targets(batch: UniterBatch, task: str) -> list[int]:
    """The classes an accuracy counts against, read on the host before the batch moves."""
    if task == "itm":
        return batch.itm_targets.tolist()
    if task == "mlm":
        return batch.mlm_labels.tolist()
    if task == "mrc":  # the top non-background class
        return (batch.mrm_soft_labels[:, 1:].argmax(-1) + 1).tolist()
    if task == "mrc-kl":
        return batch.mrm_soft_labels.argmax(-1).tolist()
    return []


def retrieval_pairs(val_paths: Sequence[str | Path], count: int, max_text_len: int | None):
    """The first ``count`` images of the held-out set, each with its first caption."""
    shards = resolve_sources(val_paths)
    tokenizer = shards[0].manifest.tokenizer
    stats = ReaderStats()
    images = itertools.chain.from_iterable(read_shard(s, stats) for s in shards)
    chosen = []
    for image in images:
        pair = next(pairs_of(image, tokenizer, max_text_len, stats), None)
        if pair is not None:
            chosen.append(pair)
        if len(chosen) == count:
            break
    return chosen


@torch.no_grad()
def itm_scores(forward: Forward, pairs, device: torch.device) -> torch.Tensor:
    """scores[i, j] = P(match) of caption i with image j, every caption against every image."""
    feats = [torch.from_numpy(p.image.feat.copy()) for p in pairs]
    positions = [torch.from_numpy(p.image.pos.copy()) for p in pairs]
    rows = []
    for pair in pairs:
        ids = [torch.from_numpy(pair.input_ids)] * len(pairs)
        batch = build_batch(ids, feats, positions, itm_targets=[0] * len(pairs)).to(device)
        logits = forward(batch, "itm").logits
        rows.append(torch.softmax(logits.float(), -1)[:, 1].cpu())
    return torch.stack(rows)


def recall_at_k(scores: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Caption i matches image i. Text -> image ranks each row; image -> text each column."""
    n = scores.size(0)
    target = torch.arange(n)
    text_rank = (scores > scores[target, target].unsqueeze(1)).sum(1)  # images scored above the true one
    image_rank = (scores > scores[target, target].unsqueeze(0)).sum(0)
    out = {}
    for k in ks:
        out[f"val/retrieval/text_to_image_r{k}"] = float((text_rank < k).float().mean())
        out[f"val/retrieval/image_to_text_r{k}"] = float((image_rank < k).float().mean())
        out[f"val/retrieval/r{k}_chance"] = min(k, n) / n
    return out


def evaluate(forward: Forward, val_paths: Sequence[str | Path], tasks: Sequence[str], *, batches: int,
             retrieval_images: int, token_budget: int, max_text_len: int | None,
             device: torch.device) -> dict[str, float]:
    metrics = evaluate_tasks(forward, val_paths, tasks, batches=batches, token_budget=token_budget,
                             max_text_len=max_text_len, device=device)
    if retrieval_images > 1:
        pairs = retrieval_pairs(val_paths, retrieval_images, max_text_len)
        if len(pairs) > 1:
            metrics |= recall_at_k(itm_scores(forward, pairs, device))
    return metrics


class Evaluation:
    """The held-out evaluation (evaluate.py) of the engine at a step, logged; {} without a held-out set."""

    def __init__(self, config: ExperimentConfig, val_shards: list[Shard], tasks: list[str], device: torch.device,
                 tracker: Tracker, rank: int):
        self.config, self.val_shards, self.tasks, self.device = config, val_shards, tasks, device
        self.tracker, self.rank = tracker, rank

    def __call__(self, engine: Any, step: int) -> dict[str, float]:
        if not self.val_shards:
            return {}
        config = self.config
        engine.eval()
        metrics = evaluate(lambda b, t: engine(b, t), self.val_shards, self.tasks, batches=config.eval.batches,
                           retrieval_images=config.eval.retrieval_images, token_budget=config.data.token_budget,
                           max_text_len=config.data.max_text_len, device=self.device)
        engine.train()
        self.tracker.log_metrics(metrics, step)
        if self.rank == 0:
            logger.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics
