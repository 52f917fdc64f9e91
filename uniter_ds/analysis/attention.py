"""What the attention heads learned: per-layer, per-head maps and the paper's six patterns.

The maps are recomputed eagerly from each layer's input (softmax(QK^T / sqrt(d)) over the real keys)
by forward hooks, so the training kernels (fused SDPA) stay as they are.

Classification rule (per head, on maps averaged into scores over the given samples). For a map A
(rows: queries, each summing to 1) of a sample with T text tokens ([CLS] ... [SEP]) then R regions:

- vertical score   V = mean over queries of the mass on the [CLS] and [SEP] columns;
- diagonal score   D = mean over queries of the mass within one position of the diagonal (|i - j| <= 1);
- within-modality  W = (text queries' mean mass on text keys + region queries' mean mass on region
  keys) / 2, each modality weighted equally (so 5 words and 95 regions do not make uniform
  attention look like a block); cross-modality X = 1 - W.

Then, first match wins:
  vertical+diagonal  V >= 0.25 and D >= 0.25 and V + D >= 0.6
  vertical           V >= 0.5
  diagonal           D >= 0.5
  block              W >= 0.8   (each modality attends to itself)
  reversed-block     X >= 0.6   (each modality attends to the other)
  heterogeneous      otherwise
Uniform attention over 12 words and 36 regions scores V 0.04, D 0.06, W 0.5: heterogeneous.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model import UniterModel
from ..model.inputs import UniterBatch
from ..model.modeling import SelfAttention

PATTERNS = ("vertical", "diagonal", "vertical+diagonal", "block", "heterogeneous", "reversed-block")
THRESHOLDS = {"combined_each": 0.25, "combined_sum": 0.6, "vertical": 0.5, "diagonal": 0.5, "block": 0.8,
              "reversed_block": 0.6}


@torch.no_grad()
def attention_maps(model: UniterModel, batch: UniterBatch) -> list[Tensor]:
    """Per sample: float32 [layers, heads, n, n] over its n = text + regions real positions."""
    captured: list[tuple[Tensor, Tensor]] = []

    def hook(module: SelfAttention, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        x, key_mask = inputs
        batch_size, length, _ = x.shape
        q, k, _ = module.qkv(x).float().view(batch_size, length, 3, module.num_heads, module.head_dim).permute(
            2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / module.head_dim**0.5
        scores = scores.masked_fill(~key_mask, float("-inf"))
        captured.append(torch.softmax(scores, dim=-1))

    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stacked = torch.stack(captured, dim=1)  # [B, layers, heads, L, L]
    lengths = (batch.txt_lens + batch.img_lens).tolist()  # compact layout: sample i at [0, n_i)
    return [stacked[i, :, :, :n, :n].cpu() for i, n in enumerate(lengths)]


def pattern_scores(attention: Tensor, num_text: int) -> dict[str, float]:
    """V, D, W, X of one [n, n] map whose first ``num_text`` positions are the text."""
    n = attention.size(-1)
    if attention.shape != (n, n) or not 2 <= num_text < n:
        raise ValueError(f"pattern_scores: need an [n, n] map and 2 <= num_text < n, got {tuple(attention.shape)} "
                         f"and num_text={num_text}")
    attention = attention.float()
    vertical = (attention[:, 0] + attention[:, num_text - 1]).mean()
    positions = torch.arange(n)
    near = (positions[:, None] - positions[None, :]).abs() <= 1
    diagonal = (attention * near).sum(-1).mean()
    is_text = positions < num_text
    on_text = attention[:, :num_text].sum(-1)
    within = (on_text[is_text].mean() + (1 - on_text[~is_text]).mean()) / 2
    return {"vertical": float(vertical), "diagonal": float(diagonal), "within_modality": float(within),
            "cross_modality": float(1 - within)}


def classify(scores: dict[str, float]) -> str:
    v, d = scores["vertical"], scores["diagonal"]
    t = THRESHOLDS
    if v >= t["combined_each"] and d >= t["combined_each"] and v + d >= t["combined_sum"]:
        return "vertical+diagonal"
    if v >= t["vertical"]:
        return "vertical"
    if d >= t["diagonal"]:
        return "diagonal"
    if scores["within_modality"] >= t["block"]:
        return "block"
    if scores["cross_modality"] >= t["reversed_block"]:
        return "reversed-block"
    return "heterogeneous"


def analyse(maps: list[Tensor], num_text: list[int]) -> dict[str, Any]:
    """Scores per layer and head averaged over the samples, the pattern of each head, and a
    layer x pattern count table."""
    layers, heads = maps[0].shape[:2]
    table = []
    for layer in range(layers):
        row = []
        for head in range(heads):
            per_sample = [pattern_scores(m[layer, head], t) for m, t in zip(maps, num_text)]
            mean = {key: sum(s[key] for s in per_sample) / len(per_sample) for key in per_sample[0]}
            row.append({"layer": layer, "head": head, "pattern": classify(mean), "scores": mean,
                        "per_sample_patterns": [classify(s) for s in per_sample]})
        table.append(row)
    counts = [{p: Counter(h["pattern"] for h in row)[p] for p in PATTERNS} for row in table]
    total = Counter(h["pattern"] for row in table for h in row)
    return {"rule": __doc__.split("Classification rule", 1)[1].strip(), "thresholds": THRESHOLDS,
            "layers": layers, "heads": heads, "samples": len(maps), "heads_by_layer": table,
            "pattern_counts_by_layer": counts, "pattern_share": {p: total[p] / (layers * heads) for p in PATTERNS}}


def plot_grid(maps: Tensor, num_text: int, analysis: dict[str, Any], path: Path, title: str) -> None:
    """Every head's map of one sample, a text/region divider, each titled with its pattern."""
    from ..plotting import pyplot

    plt = pyplot()
    layers, heads = maps.shape[:2]
    figure, axes = plt.subplots(layers, heads, figsize=(1.6 * heads, 1.7 * layers), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            axis = axes[layer][head]
            axis.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=float(maps[layer, head].max()))
            axis.axhline(num_text - 0.5, color="white", linewidth=0.5)
            axis.axvline(num_text - 0.5, color="white", linewidth=0.5)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"L{layer} H{head}\n{analysis['heads_by_layer'][layer][head]['pattern']}", fontsize=6)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_histogram(analysis: dict[str, Any], path: Path, title: str) -> None:
    from ..plotting import pyplot

    plt = pyplot()
    counts = analysis["pattern_counts_by_layer"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bottom = [0] * len(counts)
    for pattern in PATTERNS:
        values = [row[pattern] for row in counts]
        axis.bar(range(len(counts)), values, bottom=bottom, label=pattern)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_xticks(range(len(counts)), [f"layer {i}" for i in range(len(counts))])
    axis.set_ylabel("heads")
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(model: UniterModel, batch: UniterBatch, out: str | Path, source: str) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    maps = attention_maps(model, batch)
    num_text = batch.txt_lens.tolist()
    analysis = analyse(maps, num_text)
    analysis["source"] = source
    analysis["sample_lengths"] = {"text": num_text, "regions": batch.img_lens.tolist()}
    plot_grid(maps[0], num_text[0], analysis, out / "attention_maps.png",
              f"{source}: sample 0 ({num_text[0]} text tokens | {batch.img_lens[0]} regions), patterns over "
              f"{len(maps)} samples")
    plot_histogram(analysis, out / "attention_patterns.png", f"{source}: heads per pattern and layer")
    (out / "attention.json").write_text(json.dumps(analysis, indent=2) + "\n")
    return analysis
