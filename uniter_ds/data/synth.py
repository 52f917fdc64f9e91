"""A synthetic, learnable and grounded image-text corpus, for tests, demos and benchmarks.

The "world" (``world_seed``) fixes object classes, each with a feature prototype. An image holds
2-4 of the classes; every region belongs to one of them: feature = |prototype + noise|, soft label
peaked at the class, random box. Captions name some of the image's objects with a few templates.
So: MLM of an object word needs the image (the caption's other words do not tell which objects are
there), ITM needs both, MRC of a masked region (feature zeroed) needs the context, and words align
with regions of their class, which is what WRA rewards. Held-out data: same ``world_seed``, other ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import TokenizerInfo, positions_from_norm_bb
from .writer import DatasetWriter

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
OBJECTS = [
    "dog", "cat", "horse", "bird", "cow", "sheep", "person", "man", "woman", "child", "car", "bus", "truck",
    "bicycle", "boat", "train", "plane", "chair", "table", "sofa", "bed", "lamp", "clock", "vase", "bottle",
    "cup", "bowl", "plate", "pizza", "cake", "apple", "banana", "tree", "flower", "kite", "ball", "umbrella",
    "bag", "phone", "book",
]
FUNCTION_WORDS = ["a", "an", "the", "is", "are", "on", "next", "to", "near", "with", "and", "there", "in",
                  "picture", "of", "photo", "this", "shows", "sitting", "beside", "under", "image", "two", "some"]
TEMPLATES = [
    ["a", "{0}", "next", "to", "a", "{1}"],
    ["there", "is", "a", "{0}", "and", "a", "{1}", "in", "the", "picture"],
    ["a", "photo", "of", "a", "{0}"],
    ["the", "{0}", "is", "on", "the", "{1}"],
    ["this", "image", "shows", "a", "{0}", "a", "{1}", "and", "a", "{2}"],
    ["a", "{0}", "sitting", "beside", "a", "{1}", "under", "the", "{2}"],
]


def write_vocab(path: str | Path, num_classes: int) -> list[str]:
    """A WordPiece vocabulary (BERT's vocab.txt format) holding whole words only."""
    tokens = SPECIAL_TOKENS + FUNCTION_WORDS + OBJECTS[:num_classes]
    Path(path).write_text("\n".join(tokens) + "\n")
    return tokens


def synth_dataset(
    out: str | Path,
    *,
    images: int = 1000,
    img_dim: int = 2048,
    img_label_dim: int | None = 1601,
    min_regions: int = 10,
    max_regions: int = 100,
    min_captions: int = 1,
    max_captions: int = 5,
    num_classes: int = 40,
    feature_noise: float = 0.5,
    seed: int = 0,
    world_seed: int = 0,
    max_shard_bytes: int = 64 * 2**20,
    name: str = "synth",
) -> Path:
    if not 2 <= num_classes <= len(OBJECTS):
        raise ValueError(f"num_classes must be in [2, {len(OBJECTS)}], got {num_classes}")
    if not 1 <= min_regions <= max_regions:
        raise ValueError(f"need 1 <= min_regions <= max_regions, got {min_regions}, {max_regions}")
    if not 1 <= min_captions <= max_captions:
        raise ValueError(f"need 1 <= min_captions <= max_captions, got {min_captions}, {max_captions}")
    if img_label_dim is not None and img_label_dim <= num_classes:
        raise ValueError(f"img_label_dim ({img_label_dim}) must exceed num_classes ({num_classes}): 0 is background")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab.txt", num_classes)
    token_id = {t: i for i, t in enumerate(vocab)}
    tokenizer = TokenizerInfo(
        name=f"uniter-ds-synth-v1-{num_classes}", vocab_size=len(vocab),
        vocab_sha256=TokenizerInfo.hash_vocab(out / "vocab.txt"),
        cls_id=token_id["[CLS]"], sep_id=token_id["[SEP]"], mask_id=token_id["[MASK]"], pad_id=token_id["[PAD]"],
        random_range=(len(SPECIAL_TOKENS), len(vocab)), lowercase=True,
    )
    world = np.random.default_rng(world_seed)
    prototypes = np.abs(world.standard_normal((num_classes, img_dim))).astype(np.float32)
    rng = np.random.default_rng([seed, world_seed])
    source = {"converter": "synth", "images": images, "seed": seed, "world_seed": world_seed,
              "num_classes": num_classes, "regions": [min_regions, max_regions],
              "captions": [min_captions, max_captions], "feature_noise": feature_noise}
    with DatasetWriter(out, name=name, img_dim=img_dim, img_label_dim=img_label_dim, tokenizer=tokenizer,
                       max_shard_bytes=max_shard_bytes, source=source, overwrite=True) as writer:
        for index in range(images):
            present = rng.choice(num_classes, size=int(rng.integers(2, 5)), replace=False)
            n = int(rng.integers(min_regions, max_regions + 1))
            # Every present class gets at least one region.
            classes = np.concatenate([present, rng.choice(present, size=max(0, n - len(present)))])[:n]
            rng.shuffle(classes)
            feat = np.abs(prototypes[classes] + feature_noise * rng.standard_normal((n, img_dim), dtype=np.float32))
            xy = rng.uniform(0.0, 0.7, size=(n, 2))
            wh = rng.uniform(0.05, 0.3, size=(n, 2))
            norm_bb = np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)
            soft = None
            if img_label_dim is not None:
                soft = np.full((n, img_label_dim), 0.2 / img_label_dim, dtype=np.float32)
                soft[:, 0] += 0.1
                soft[np.arange(n), classes + 1] += 0.7
                soft /= soft.sum(1, keepdims=True)
            captions = []
            for c in range(int(rng.integers(min_captions, max_captions + 1))):
                template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
                slots = sum(1 for w in template if w.startswith("{"))
                named = rng.choice(present, size=slots, replace=slots > len(present))
                words = [OBJECTS[named[int(w[1])]] if w.startswith("{") else w for w in template]
                captions.append({"id": f"synth{index}_{c}", "text": " ".join(words),
                                 "input_ids": [token_id[w] for w in words]})
            writer.add(
                f"synth{index}", feat, positions_from_norm_bb(norm_bb), captions,
                conf=rng.uniform(0.2, 1.0, size=n), soft=soft,
                extra={"classes": classes.tolist(), "width": 640, "height": 480},
            )
    return out
