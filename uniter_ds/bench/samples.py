"""Random image-text samples with their MLM / MRM targets, and batches of them: the inputs of the
model tests and of the benchmarks that time the model alone (no data path)."""

from __future__ import annotations

import torch

from ..model import IGNORE_INDEX, UniterBatch, UniterConfig, build_batch


def random_sample(config: UniterConfig, txt_len: int, num_regions: int, generator: torch.Generator) -> dict:
    """One image-text pair with its MLM / MRM targets, as the data path would produce it."""
    words = torch.randint(5, config.vocab_size, (txt_len - 2,), generator=generator)
    input_ids = torch.cat([torch.tensor([1]), words, torch.tensor([2])])
    txt_labels = torch.full((txt_len,), IGNORE_INDEX)
    masked = torch.randperm(txt_len - 2, generator=generator)[: max(1, (txt_len - 2) // 4)] + 1
    txt_labels[masked] = input_ids[masked]
    img_masks = torch.zeros(num_regions, dtype=torch.bool)
    img_masks[torch.randperm(num_regions, generator=generator)[: max(1, num_regions // 4)]] = True
    boxes = torch.rand(num_regions, 7, generator=generator)
    soft = torch.softmax(3 * torch.randn(num_regions, config.img_label_dim, generator=generator), -1)
    return {
        "input_ids": input_ids,
        "img_feat": torch.randn(num_regions, config.img_dim, generator=generator),
        "img_pos": boxes,
        "txt_labels": txt_labels,
        "img_masks": img_masks,
        "img_soft_labels": soft,
    }


def collate(samples: list[dict], itm_targets: list[int] | None = None, pack_row_len: int | None = None
            ) -> UniterBatch:
    return build_batch(
        [s["input_ids"] for s in samples],
        [s["img_feat"] for s in samples],
        [s["img_pos"] for s in samples],
        txt_labels=[s["txt_labels"] for s in samples],
        img_masks=[s["img_masks"] for s in samples],
        img_soft_labels=[s["img_soft_labels"] for s in samples],
        itm_targets=itm_targets if itm_targets is not None else [1] * len(samples),
        pack_row_len=pack_row_len,
    )
