"""Downstream probes that need no external data: what an exported encoder's representations hold.

A frozen encoder (loaded the way a fine-tuning user loads an export) gives features; for the first
two probes a linear head is trained on them for a fixed budget (full batch, Adam, standardised
features, fixed seed) and scored on held-out images. On the synthetic grounded corpus, where every
region has an object class and captions name some of the image's objects:

- ``objects``: which object classes the image holds, from the pooled output of (caption, image):
  multi-label, macro average precision over classes. The caption names only some of them.
- ``match``: does the image belong to the caption, from the pooled output; the mismatched image
  shares no object class with the caption's own. Accuracy (chance 0.5).
- ``grounding`` (zero-shot, nothing trained): for every object word of a caption, the region whose
  final state is most cosine-similar to the word's final state; accuracy of that region showing the
  word's object (chance: the share of the image's regions showing it, reported as
  ``grounding_chance``). What word-region alignment should teach.

A per-region class probe was tried first and dropped: region features are class prototypes plus
noise, so a linear head reads the class off a random encoder's region states (accuracy 1.00), and the
probe cannot tell arms apart. Object presence is near its ceiling at random init too (AP ~0.93).

Meta-Sum (as the paper's ablation table) = 100 x (objects AP + match accuracy + grounding accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import ReaderStats, read_shard, resolve_sources
from ..data.reader import Pair, pairs_of
from ..data.synth import FUNCTION_WORDS, SPECIAL_TOKENS
from ..model import UniterModel, build_batch

PROBES = ("objects", "match", "grounding")


def probe_pairs(folder: str | Path, images: int) -> list[Pair]:
    """The first ``images`` images of a dataset folder with their first caption; every sample must
    record its regions' classes (``classes`` in its JSON, as synthetic shards do)."""
    shards = resolve_sources([folder])
    tokenizer = shards[0].manifest.tokenizer
    stats = ReaderStats()
    pairs: list[Pair] = []
    for shard in shards:
        for image in read_shard(shard, stats):
            if "classes" not in image.extra:
                raise ValueError(f"{shard.path}: sample {image.key} has no 'classes' field; the probes need each "
                                 "region's object class (synthetic shards record it)")
            pair = next(pairs_of(image, tokenizer, None, stats), None)
            if pair is not None:
                pairs.append(pair)
            if len(pairs) == images:
                return pairs
    return pairs


@dataclass
class ProbeFeatures:
    pooled: Tensor  # [N, H], (caption, own image)
    pooled_mismatched: Tensor  # [N, H], (caption, an image sharing no class)
    objects: Tensor  # [N, C] multi-hot
    grounding_hits: Tensor  # [W] bool, per object word: the most similar region shows its object
    grounding_chance: Tensor  # [W] the share of the image's regions that show the word's object


@torch.no_grad()
def extract(model: UniterModel, pairs: list[Pair], num_classes: int, seed: int = 0,
            batch_size: int = 64) -> ProbeFeatures:
    model.eval()
    rng = np.random.default_rng(seed)
    classes = [set(p.image.extra["classes"]) for p in pairs]
    mismatched = []
    for i in range(len(pairs)):
        candidates = [j for j in range(len(pairs)) if not (classes[i] & classes[j])]
        if not candidates:
            raise ValueError("probe pairs: an image shares a class with every other; use more images")
        mismatched.append(int(rng.choice(candidates)))
    first_object = len(SPECIAL_TOKENS) + len(FUNCTION_WORDS)  # the synthetic vocabulary's object words
    pooled, pooled_mismatched, hits, chance = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = range(start, min(start + batch_size, len(pairs)))
        ids = [torch.from_numpy(pairs[i].input_ids.copy()) for i in chunk]
        for images, sink in ((list(chunk), pooled), ([mismatched[i] for i in chunk], pooled_mismatched)):
            feats = [torch.from_numpy(pairs[j].image.feat.astype(np.float32)) for j in images]
            positions = [torch.from_numpy(pairs[j].image.pos.copy()) for j in images]
            out = model(build_batch(ids, feats, positions))
            sink.append(out.pooled_output.float())
            if sink is pooled:
                for sample, j, tokens in zip(out.per_sample(), images, ids):
                    region_classes = torch.as_tensor(pairs[j].image.extra["classes"])
                    words = (tokens >= first_object).nonzero().flatten()
                    similarity = torch.nn.functional.normalize(sample["text"][words].float(), dim=-1) @ \
                        torch.nn.functional.normalize(sample["regions"].float(), dim=-1).T
                    word_classes = tokens[words] - first_object
                    hits.append(region_classes[similarity.argmax(-1)] == word_classes)
                    chance.append((region_classes[None, :] == word_classes[:, None]).float().mean(-1))
    objects = torch.zeros(len(pairs), num_classes)
    for i, present in enumerate(classes):
        objects[i, list(present)] = 1.0
    return ProbeFeatures(torch.cat(pooled), torch.cat(pooled_mismatched), objects, torch.cat(hits),
                         torch.cat(chance))


def train_linear(x: Tensor, y: Tensor, loss: str, *, steps: int = 300, lr: float = 0.01, weight_decay: float = 1e-4,
                 seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor]:
    """A linear head on standardised features; returns (head, mean, std) to apply it to new data."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    outputs = y.size(1) if loss == "bce" else int(y.max()) + 1
    head = nn.Linear(x.size(1), outputs)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = nn.BCEWithLogitsLoss() if loss == "bce" else nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(head(x), y).backward()
        optimizer.step()
    return head, mean, std


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Macro AP over the columns that have at least one positive."""
    aps = []
    for column in range(labels.size(1)):
        positives = labels[:, column] > 0
        if not positives.any():
            continue
        order = scores[:, column].argsort(descending=True)
        hits = positives[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / len(aps)


@torch.no_grad()
def _apply(head: nn.Linear, mean: Tensor, std: Tensor, x: Tensor) -> Tensor:
    return head((x - mean) / std)


def run_probes(train: ProbeFeatures, test: ProbeFeatures, *, steps: int = 300, seed: int = 0) -> dict[str, Any]:
    head, mean, std = train_linear(train.pooled, train.objects, "bce", steps=steps, seed=seed)
    objects_ap = average_precision(_apply(head, mean, std, test.pooled), test.objects)

    def match_data(features: ProbeFeatures) -> tuple[Tensor, Tensor]:
        x = torch.cat([features.pooled, features.pooled_mismatched])
        y = torch.cat([torch.ones(len(features.pooled)), torch.zeros(len(features.pooled))]).long()
        return x, y

    head, mean, std = train_linear(*match_data(train), "ce", steps=steps, seed=seed)
    x, y = match_data(test)
    match_accuracy = float((_apply(head, mean, std, x).argmax(-1) == y).float().mean())

    scores = {"objects": objects_ap, "match": match_accuracy, "grounding": float(test.grounding_hits.float().mean())}
    return scores | {"meta_sum": 100 * sum(scores.values()), "grounding_chance": float(test.grounding_chance.mean())}
