"""Per-task input changes (conditional masking, ITM negatives), token-budget batching and collation.

Masking follows the reference implementation exactly:
- MLM: each word token (never [CLS]/[SEP]) is chosen with probability 0.15; a chosen token becomes
  [MASK] with probability 0.8, a random id from the tokenizer's word range with 0.1, and stays with 0.1.
  If no token was chosen, the first word is chosen and becomes [MASK].
- MRFR / MRC / MRC-kl: each region is chosen with probability 0.15, at least one (a random one).
  The model zeroes the chosen features and adds the mask embedding; the targets stay in the batch.
- ITM: with probability 0.5 the image is replaced by another image (never the pair's own), target 0.
Conditional masking: one task per batch, only that task's modality masked. Joint masking (the paper's
ablation): MLM and MRM batches have both modalities masked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..model.inputs import IGNORE_INDEX, UniterBatch, batch_from_padded, best_fit_rows, pack
from ..model.tasks import REGION_TASKS, SOFT_LABEL_TASKS, check_task
from .format import DataError, TokenizerInfo
from .reader import ImageRecord, Pair


@dataclass
class TaskSample:
    """A pair after its task's input changes, ready to collate."""

    pair_id: tuple[str, int]  # (image key, caption index) of the caption
    image_key: str  # the image actually paired (differs from pair_id[0] for ITM negatives)
    input_ids: np.ndarray
    feat: np.ndarray
    pos: np.ndarray
    soft: np.ndarray | None
    txt_labels: np.ndarray | None = None
    img_mask: np.ndarray | None = None
    itm_target: int | None = None
    # The pair's image and the image shown with its text (another one for an ITM negative): a saved
    # data position refers to them rather than holding their features.
    pair_image: ImageRecord | None = None
    shown_image: ImageRecord | None = None
    pack_row: int | None = None  # its row in its batch, set by the row-filling batcher

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.feat)


def mask_text(input_ids: np.ndarray, tokenizer: TokenizerInfo, rng: np.random.Generator,
              mask_prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """MLM corruption of ``[CLS] words [SEP]``: (corrupted ids, labels with IGNORE_INDEX where not a target)."""
    words = input_ids[1:-1]
    draw = rng.random(len(words))
    chosen = draw < mask_prob
    if not chosen.any():
        chosen[0], draw[0] = True, 0.0  # the reference's fallback: the first word, as [MASK]
    within = draw / mask_prob
    corrupted = words.copy()
    to_mask = chosen & (within < 0.8)
    to_random = chosen & (within >= 0.8) & (within < 0.9)
    corrupted[to_mask] = tokenizer.mask_id
    corrupted[to_random] = rng.integers(*tokenizer.random_range, size=int(to_random.sum()))
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[1:-1][chosen] = words[chosen]
    out = input_ids.copy()
    out[1:-1] = corrupted
    return out, labels


def mask_regions(num_regions: int, rng: np.random.Generator, mask_prob: float = 0.15) -> np.ndarray:
    chosen = rng.random(num_regions) < mask_prob
    if not chosen.any():
        chosen[rng.integers(num_regions)] = True
    return chosen


class TaskTransform:
    """Applies one task's input changes to a stream of pairs (stateful for ITM's pool of other images)."""

    def __init__(self, task: str, tokenizer: TokenizerInfo, rng: np.random.Generator, *,
                 mask_prob: float = 0.15, itm_neg_prob: float = 0.5, joint_masking: bool = False,
                 negative_pool: int = 256):
        check_task(task)
        self.task, self.tokenizer, self.rng = task, tokenizer, rng
        self.mask_prob, self.itm_neg_prob, self.joint = mask_prob, itm_neg_prob, joint_masking
        self.pool: deque[ImageRecord] = deque(maxlen=negative_pool)
        self.forced_positives = 0  # ITM pairs that were to be negatives but had no other image yet

    def __call__(self, pair: Pair) -> TaskSample:
        image = pair.image
        sample = TaskSample((image.key, pair.caption_index), image.key, pair.input_ids, image.feat, image.pos,
                            image.soft, pair_image=image, shown_image=image)
        if self.task == "itm":
            sample.itm_target = 1
            if self.rng.random() < self.itm_neg_prob:
                negative = self._other_image(image)
                if negative is None:
                    self.forced_positives += 1
                else:
                    sample.image_key, sample.feat, sample.pos, sample.soft, sample.shown_image = (
                        negative.key, negative.feat, negative.pos, negative.soft, negative)
                    sample.itm_target = 0
            self.pool.append(image)
            return sample
        if self.task == "mlm" or self.joint:
            sample.input_ids, sample.txt_labels = mask_text(pair.input_ids, self.tokenizer, self.rng, self.mask_prob)
        if self.task in REGION_TASKS or self.joint:
            sample.img_mask = mask_regions(len(image.feat), self.rng, self.mask_prob)
        return sample

    def _other_image(self, image: ImageRecord) -> ImageRecord | None:
        candidates = [other for other in self.pool if other.image_id != image.image_id]
        if not candidates:
            return None
        return candidates[int(self.rng.integers(len(candidates)))]


class BudgetBatcher:
    """Micro-batches of similar-length samples with (count x longest) <= token_budget.

    The streaming form of the reference's token-bucket sampler: samples gather in a pool until it
    holds ``pool_budgets`` budgets' worth of tokens (at least ``min_pool_tokens``, about the
    reference's 8192-pair pool, so small budgets pad as little as large ones); the pool is sorted by
    length and cut into batches, each as large as fits; the full batches leave in random order and the
    last, unfinished one (the pool's longest samples) stays for the next pool. So every batch but the
    stream's last fills >= 95% of the budget at any budget, with 1-5% padding on 10-100-region data
    (tested), and the memory held is the pool. (Length buckets with a cap on waiting samples, the first
    design, flushed half-empty buckets at large budgets: a 64k budget ran ~20k-token batches.) A sample
    longer than the budget goes alone. Its state (``pool``, ``pending``) is plain, for exact resume.
    """

    def __init__(self, token_budget: int, pool_budgets: int = 16, rng: np.random.Generator | None = None,
                 min_pool_tokens: int = 2**18):
        self.token_budget, self.rng = token_budget, rng or np.random.default_rng(0)
        self.pool_tokens = max(pool_budgets * token_budget, min_pool_tokens)
        self.pool: list[TaskSample] = []
        self.pooled = 0
        self.pending: deque[list[TaskSample]] = deque()  # cut, not yet taken

    def add(self, sample: TaskSample) -> bool:
        """Pool a sample; True when that filled the pool and it was cut into ``pending`` batches."""
        self.pool.append(sample)
        self.pooled += sample.num_tokens
        if self.pooled < self.pool_tokens:
            return False
        self._cut(final=False)
        self.pooled = sum(s.num_tokens for s in self.pool)
        return True

    def finish(self) -> None:
        """The input has ended: every pooled sample into ``pending``, the last batch possibly short."""
        self._cut(final=True)
        self.pooled = 0

    def _cut(self, final: bool) -> None:
        self.pool.sort(key=lambda s: s.num_tokens)
        batches: list[list[TaskSample]] = []
        batch: list[TaskSample] = []
        for sample in self.pool:
            if batch and (len(batch) + 1) * sample.num_tokens > self.token_budget:
                batches.append(batch)
                batch = []
            batch.append(sample)
        self.pool = [] if final else batch
        self.pending.extend(batches[i] for i in self.rng.permutation(len(batches)))
        if final and batch:
            self.pending.append(batch)


class RowBatcher(BudgetBatcher):
    """Micro-batches of exactly ``token_budget // row_len`` rows of ``row_len`` tokens, for the packed
    layout: the encoder then sees one shape for the whole run (CUDA graphs, compiled layers).

    Each cut packs the pool best-fit decreasing into rows (model/inputs.py: ``best_fit_rows``); whole
    batches of the fullest rows leave (in random order), and the fewer than R least-filled rows go back
    to the pool, to be packed again with the next samples; the stream's last batch may hold fewer rows
    (collate pads it with empty ones). Each sample's ``pack_row`` says its row in its batch.
    """

    def __init__(self, token_budget: int, row_len: int, pool_budgets: int = 16,
                 rng: np.random.Generator | None = None, min_pool_tokens: int = 2**18):
        if row_len > token_budget:
            raise ValueError(f"the row-filling batcher needs token_budget ({token_budget}) >= pack_row_len ({row_len})")
        super().__init__(token_budget, pool_budgets, rng, min_pool_tokens)
        self.row_len, self.rows_per_batch = row_len, token_budget // row_len

    def add(self, sample: TaskSample) -> bool:
        if sample.num_tokens > self.row_len:
            raise DataError(f"sample {sample.pair_id} (image {sample.image_key!r}) has {sample.num_tokens} tokens "
                            f"(text + regions), more than a packed row holds: raise data.pack_row_len "
                            f"({self.row_len}) to at least the longest sample")
        return super().add(sample)

    def _cut(self, final: bool) -> None:
        rows = best_fit_rows([s.num_tokens for s in self.pool], self.row_len)
        leaving = len(rows) if final else len(rows) - len(rows) % self.rows_per_batch
        order = self.rng.permutation(leaving)
        for first in range(0, leaving, self.rows_per_batch):
            batch = []
            for row, chosen in enumerate(order[first:first + self.rows_per_batch]):
                for i in rows[chosen]:
                    self.pool[i].pack_row = row
                    batch.append(self.pool[i])
            self.pending.append(batch)
        self.pool = [self.pool[i] for row in rows[leaving:] for i in row]


def budget_batches(samples: Iterator[TaskSample], token_budget: int, pool_budgets: int = 16,
                   rng: np.random.Generator | None = None, min_pool_tokens: int = 2**18
                   ) -> Iterator[list[TaskSample]]:
    """``BudgetBatcher`` over a stream of samples."""
    batcher = BudgetBatcher(token_budget, pool_budgets, rng, min_pool_tokens)
    for sample in samples:
        if batcher.add(sample):
            while batcher.pending:
                yield batcher.pending.popleft()
    batcher.finish()
    while batcher.pending:
        yield batcher.pending.popleft()


def _pad(arrays: list[np.ndarray], length: int, fill: float = 0, dtype: np.dtype | None = None) -> torch.Tensor:
    first = arrays[0]
    out = np.full((len(arrays), length, *first.shape[1:]), fill, dtype=dtype or first.dtype)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    return torch.from_numpy(out)


def collate(samples: list[TaskSample], task: str, pad_to_multiple_of: int = 1,
            pack_row_len: int | None = None, pack_rows: int | None = None) -> UniterBatch:
    """Pad in numpy (one copy per field, straight from the decoded shard buffers) and build the batch.
    ``pack_row_len``: also the packed layout, in the samples' ``pack_row`` s when the row-filling batcher
    set them (padded with empty rows to ``pack_rows``), else packed here."""
    txt_lens = [len(s.input_ids) for s in samples]
    img_lens = [len(s.feat) for s in samples]
    max_txt, max_img = max(txt_lens), max(img_lens)
    masks = task in REGION_TASKS or samples[0].img_mask is not None
    batch = batch_from_padded(
        input_ids=_pad([s.input_ids for s in samples], max_txt, dtype=np.int64),
        txt_lens=torch.tensor(txt_lens),
        img_feat=_pad([s.feat for s in samples], max_img),
        img_pos=_pad([s.pos for s in samples], max_img),
        img_lens=torch.tensor(img_lens),
        txt_labels=(_pad([s.txt_labels for s in samples], max_txt, fill=IGNORE_INDEX)
                    if samples[0].txt_labels is not None else None),
        img_masks=_pad([s.img_mask for s in samples], max_img, fill=False) if masks else None,
        # Soft labels travel for the masked regions only: 15% of the bytes of padded [B, Ni, 1601].
        mrm_soft_labels=(torch.from_numpy(np.concatenate([s.soft[s.img_mask] for s in samples]))
                         if task in SOFT_LABEL_TASKS else None),
        itm_targets=torch.tensor([s.itm_target for s in samples]) if task == "itm" else None,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    if pack_row_len is not None:
        pack(batch, pack_row_len, None if samples[0].pack_row is None else [s.pack_row for s in samples], pack_rows)
    batch.meta = {
        "task": task,
        "pairs": [s.pair_id for s in samples],
        "images": [s.image_key for s in samples],
        "real_tokens": sum(txt_lens) + sum(img_lens),
        "lengths": [t + i for t, i in zip(txt_lens, img_lens)],  # per sample, on the host (FLOP counts)
        "padded_tokens": batch.padded_tokens(),
    }
    return batch
