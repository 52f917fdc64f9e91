"""``uniter-ds data inspect``: a dataset's summary, and every sample validated."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .reader import ReaderStats, read_shard, resolve_sources


def inspect_dataset(folder: str | Path, max_examples: int = 10) -> dict[str, Any]:
    shards = resolve_sources([folder])
    manifest = shards[0].manifest
    stats = ReaderStats()
    problems: Counter = Counter()
    examples: list[str] = []
    vocab = manifest.tokenizer.vocab_size

    def problem(kind: str, message: str) -> None:
        problems[kind] += 1
        if len(examples) < max_examples:
            examples.append(message)

    for shard in shards:
        for image in read_shard(shard, stats, on_error="skip"):
            where = f"{shard.name}: sample {image.key!r}"
            for name, array in (("feat", image.feat), ("pos", image.pos), ("soft", image.soft)):
                if array is not None and not np.isfinite(array.astype(np.float32)).all():
                    problem(f"non_finite_{name}", f"{where}: {name} has NaN or inf")
            if image.pos.size and (image.pos.min() < -0.01 or image.pos.max() > 1.01):
                problem("positions_out_of_range", f"{where}: positions outside [0, 1]")
            for caption in image.captions:
                ids = caption["input_ids"]
                if any(not 0 <= t < vocab for t in ids):
                    problem("token_out_of_vocab",
                            f"{where}: caption {caption.get('id')!r} has ids outside [0, {vocab})")
    for kind, count in stats.errors.items():
        problems[kind] += count
    examples = stats.last_errors[:max_examples] + examples[: max_examples - len(stats.last_errors)]
    return {
        "folder": str(folder),
        "name": manifest.name,
        "format_version": manifest.format_version,
        "shards": len(shards),
        "images": manifest.images,
        "pairs": manifest.pairs,
        "images_read": stats.images,
        "img_dim": manifest.img_dim,
        "img_label_dim": manifest.img_label_dim,
        "tokenizer": manifest.tokenizer.name,
        "regions": {k: v for k, v in manifest.regions.items() if k != "histogram"},
        "text_lengths": {k: v for k, v in manifest.text_lengths.items() if k != "histogram"},
        "problems": dict(problems),
        "examples": examples,
        "ok": not problems and stats.images == manifest.images,
    }
