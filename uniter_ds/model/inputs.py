"""What the model's forward takes: a padded batch plus the index that packs it into the compact layout.

Per sample the encoder sees ``[CLS] w1 .. wn [SEP] r1 .. rk`` with padding only at the end
(the layout of the reference implementation). Text and regions are padded separately
(``input_ids`` [B, Lt], ``img_feat`` [B, Ni, D]); the model embeds both, concatenates them to
[B, Lt + Ni, H] and gathers with ``gather_index`` [B, L] into the compact order, L = max(tl + nr).

Everything that needs a host-side length (L, the masked positions) is computed here, on the CPU,
by :func:`build_batch`, so the forward pass itself never synchronises with the host.

The packed layout (``pack_row_len``): the encoder runs the samples packed into rows of a fixed length
(best-fit decreasing, no sample split), each token attending only to its own sample's tokens
(``pack_segments``); the embeddings before it and the heads after it see the compact layout. With a
row length fixed for a run, the encoder's shapes vary only in the number of rows, and not at all with
the loader's row-filling batcher (``data.batching: rows``), whose batches are always R rows.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class UniterBatch:
    input_ids: Tensor  # [B, Lt] long, padded with 0
    txt_lens: Tensor  # [B] long, including [CLS] and [SEP]
    img_feat: Tensor  # [B, Ni, img_dim], padded with 0
    img_pos: Tensor  # [B, Ni, img_pos_dim]
    img_lens: Tensor  # [B] long
    gather_index: Tensor  # [B, L] long: compact position -> index into cat(text, regions)
    attn_mask: Tensor  # [B, L] bool: True on real positions
    img_masks: Tensor | None = None  # [B, Ni] bool: regions masked for MRM (feature zeroed in the model)
    # Targets, present for the tasks that use them.
    mlm_positions: Tensor | None = None  # [M] long: flat index into [B * L] of masked text tokens
    mlm_labels: Tensor | None = None  # [M] long: original token ids there
    mrm_positions: Tensor | None = None  # [R] long: flat index into [B * L] of masked regions
    mrm_img_index: Tensor | None = None  # [R] long: flat index into [B * Ni] of the same regions
    mrm_soft_labels: Tensor | None = None  # [R, img_label_dim]: detector class distributions at those regions
    itm_targets: Tensor | None = None  # [B] long: 1 = matched pair, 0 = swapped image
    # The packed layout, when asked for: R rows of a fixed length Lr.
    pack_index: Tensor | None = None  # [R, Lr] long: flat index into [B * L] of the token in each row slot
    pack_segments: Tensor | None = None  # [R, Lr] long: the slot's sample (index in the batch), -1 on padding
    unpack_index: Tensor | None = None  # [B, L] long: flat index into [R * Lr] of each compact position
    pack_offsets: Tensor | None = None  # [S + 1] long: where each sample and each row's padding tail starts
    #                                     in the flattened rows (the nested attention's sequences), then R * Lr
    meta: dict | None = None  # what the data path knows about the batch (ids, token counts, reader stats)

    @property
    def batch_size(self) -> int:
        return self.input_ids.size(0)

    @property
    def seq_len(self) -> int:
        return self.gather_index.size(1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UniterBatch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return UniterBatch(**moved)

    def pin_memory(self) -> UniterBatch:
        pinned = {
            f.name: (v.pin_memory() if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return UniterBatch(**pinned)

    def real_tokens(self) -> int:
        return int(self.attn_mask.sum())

    def padded_tokens(self) -> int:
        """The tokens the encoder runs, padding included: [B, L], or [R, Lr] packed."""
        return self.attn_mask.numel() if self.pack_index is None else self.pack_index.numel()


def _pad_stack(tensors: Sequence[Tensor], length: int, fill: float = 0) -> Tensor:
    first = tensors[0]
    out = first.new_full((len(tensors), length, *first.shape[1:]), fill)
    for i, t in enumerate(tensors):
        out[i, : t.size(0)] = t
    return out


def build_batch(
    input_ids: Sequence[Tensor],
    img_feat: Sequence[Tensor],
    img_pos: Sequence[Tensor],
    *,
    img_masks: Sequence[Tensor] | None = None,
    txt_labels: Sequence[Tensor] | None = None,
    img_soft_labels: Sequence[Tensor] | None = None,
    itm_targets: Sequence[int] | Tensor | None = None,
    pad_to_multiple_of: int = 1,
    pack_row_len: int | None = None,
) -> UniterBatch:
    """Collate per-sample tensors into a :class:`UniterBatch`.

    input_ids[i]: [tl] token ids including [CLS]/[SEP]; img_feat[i]: [n, D] (n may be 0);
    img_pos[i]: [n, 7]; img_masks[i]: [n] bool; txt_labels[i]: [tl] with IGNORE_INDEX where a
    token is not an MLM target; img_soft_labels[i]: [n, C] (only the masked regions' rows are kept).
    """
    batch = len(input_ids)
    if not (len(img_feat) == len(img_pos) == batch):
        raise ValueError(
            f"build_batch: got {batch} texts, {len(img_feat)} feature sets and {len(img_pos)} position sets"
        )
    for i in range(batch):
        if input_ids[i].dim() != 1 or input_ids[i].numel() < 1:
            raise ValueError(f"build_batch: sample {i}: input_ids must be a non-empty 1-D tensor, "
                             f"got shape {tuple(input_ids[i].shape)}")
        if img_feat[i].dim() != 2 or img_pos[i].dim() != 2 or img_feat[i].size(0) != img_pos[i].size(0):
            raise ValueError(f"build_batch: sample {i}: img_feat {tuple(img_feat[i].shape)} and img_pos "
                             f"{tuple(img_pos[i].shape)} must be [n, D] and [n, P] with the same n")
    max_txt = max(t.size(0) for t in input_ids)
    max_img = max(f.size(0) for f in img_feat)
    return batch_from_padded(
        input_ids=_pad_stack(input_ids, max_txt),
        txt_lens=torch.tensor([t.size(0) for t in input_ids], dtype=torch.long),
        img_feat=_pad_stack(img_feat, max_img),
        img_pos=_pad_stack(img_pos, max_img),
        img_lens=torch.tensor([f.size(0) for f in img_feat], dtype=torch.long),
        txt_labels=_pad_stack(txt_labels, max_txt, fill=IGNORE_INDEX) if txt_labels is not None else None,
        img_masks=_pad_stack([m.bool() for m in img_masks], max_img, fill=False) if img_masks is not None else None,
        mrm_soft_labels=(torch.cat([soft[mask.bool()] for soft, mask in zip(img_soft_labels, img_masks)])
                         if img_soft_labels is not None and img_masks is not None else None),
        itm_targets=torch.as_tensor(itm_targets, dtype=torch.long) if itm_targets is not None else None,
        pad_to_multiple_of=pad_to_multiple_of, pack_row_len=pack_row_len,
    )


def batch_from_padded(
    *,
    input_ids: Tensor,
    txt_lens: Tensor,
    img_feat: Tensor,
    img_pos: Tensor,
    img_lens: Tensor,
    txt_labels: Tensor | None = None,
    img_masks: Tensor | None = None,
    mrm_soft_labels: Tensor | None = None,
    itm_targets: Tensor | None = None,
    pad_to_multiple_of: int = 1,
    pack_row_len: int | None = None,
) -> UniterBatch:
    """The batch from text and regions already padded separately ([B, Lt], [B, Ni, ...]) + their lengths:
    adds the compact-layout index and the flat positions of the MLM / MRM targets.
    ``mrm_soft_labels``: the soft labels of the masked regions only, in row-major (sample, region) order.
    ``pack_row_len``: also the packed layout's index, rows of that many tokens."""
    batch, max_txt = input_ids.shape
    max_img = img_feat.size(1)
    seq_len = int((txt_lens + img_lens).max())
    seq_len = -(-seq_len // pad_to_multiple_of) * pad_to_multiple_of

    # Compact order: position p of sample b reads text slot p (p < tl), then region slot
    # max_txt + (p - tl) (p < tl + nr); padding reads slot 0 and is masked out.
    pos = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    tl, total = txt_lens.unsqueeze(1), (txt_lens + img_lens).unsqueeze(1)
    attn_mask = pos < total
    gather_index = torch.where(pos < tl, pos, max_txt + pos - tl)
    gather_index = torch.where(attn_mask, gather_index, torch.zeros_like(gather_index))

    out = UniterBatch(input_ids=input_ids, txt_lens=txt_lens, img_feat=img_feat, img_pos=img_pos, img_lens=img_lens,
                      gather_index=gather_index, attn_mask=attn_mask, mrm_soft_labels=mrm_soft_labels,
                      itm_targets=itm_targets)
    if txt_labels is not None:
        rows, cols = (txt_labels != IGNORE_INDEX).nonzero(as_tuple=True)
        out.mlm_positions = rows * seq_len + cols  # text slot t sits at compact position t
        out.mlm_labels = txt_labels[rows, cols]
    if img_masks is not None:
        out.img_masks = img_masks
        rows, cols = img_masks.nonzero(as_tuple=True)
        out.mrm_positions = rows * seq_len + txt_lens[rows] + cols
        out.mrm_img_index = rows * max_img + cols
    if pack_row_len is not None:
        pack(out, pack_row_len)
    return out


def best_fit_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Samples of ``lengths`` into rows of ``row_len`` slots, best-fit decreasing (each sample, longest
    first, into the row it fills most tightly): the rows as sample indices, fullest row first."""
    too_long = [i for i, length in enumerate(lengths) if length > row_len]
    if too_long:
        raise ValueError(f"pack_row_len {row_len} is shorter than a sample of {lengths[too_long[0]]} tokens (text + "
                         f"regions); raise data.pack_row_len to at least the longest sample")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free slots, row), sorted: the tightest fit is a bisection away
    for sample in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(room, (lengths[sample], -1))
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = row_len, len(rows)
            rows.append([])
        rows[row].append(sample)
        if free > lengths[sample]:
            bisect.insort(room, (free - lengths[sample], row))
    return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))


def pack_plan(lengths: Sequence[int], seq_len: int, row_len: int, rows: Sequence[int] | None = None,
              num_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Samples of ``lengths`` (compact layout, ``seq_len`` per sample) into rows of ``row_len`` slots:
    (pack_index [R, Lr], pack_segments [R, Lr], unpack_index [B, L]). ``rows``: each sample's row, in
    sample order within a row (default: :func:`best_fit_rows`); ``num_rows``: at least this many rows
    (the rest empty), so every batch of a row-filling stream has one shape."""
    if rows is None:
        rows = [0] * len(lengths)
        for row, samples in enumerate(best_fit_rows(lengths, row_len)):
            for sample in samples:
                rows[sample] = row
    count = max(max(rows) + 1, num_rows or 0)
    used = [0] * count
    starts = []
    for sample, (row, length) in enumerate(zip(rows, lengths)):
        starts.append(used[row])
        used[row] += length
        if used[row] > row_len:
            raise ValueError(f"pack_plan: row {row} holds {used[row]} tokens, more than pack_row_len {row_len} "
                             f"(at sample {sample})")
    pack_index = torch.zeros(count, row_len, dtype=torch.long)
    segments = torch.full((count, row_len), -1, dtype=torch.long)
    unpack_index = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for sample, (row, start, length) in enumerate(zip(rows, starts, lengths)):
        slots = torch.arange(start, start + length)
        pack_index[row, slots] = sample * seq_len + torch.arange(length)
        segments[row, slots] = sample
        unpack_index[sample, :length] = row * row_len + slots
    return pack_index, segments, unpack_index


def pack(batch: UniterBatch, row_len: int, rows: Sequence[int] | None = None,
         num_rows: int | None = None) -> UniterBatch:
    """Adds the packed layout to ``batch`` (in place; :func:`pack_plan` says how the arguments place the
    samples): the gather and scatter indices, each slot's sample, and the sequences' offsets."""
    lengths = (batch.txt_lens + batch.img_lens).tolist()
    batch.pack_index, batch.pack_segments, batch.unpack_index = pack_plan(lengths, batch.seq_len, row_len, rows,
                                                                          num_rows)
    flat = batch.pack_segments.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::row_len] = True  # a padding tail never runs on into the next row
    batch.pack_offsets = torch.cat([starts.nonzero().squeeze(1), torch.tensor([flat.numel()])])
    return batch


def batch_from_masks(
    *,
    input_ids: Tensor,
    img_feat: Tensor,
    img_pos: Tensor,
    attention_mask: Tensor | None = None,
    img_attention_mask: Tensor | None = None,
    img_masks: Tensor | None = None,
) -> UniterBatch:
    """The Hugging Face-style entry: text [B, Lt] and regions [B, Ni, ...] each padded at the end, with
    0/1 masks (all ones when omitted). Reads the longest sample's length on the host (one sync); the
    training path builds batches on the host instead (:func:`build_batch`)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if img_attention_mask is None:
        img_attention_mask = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
    if attention_mask.shape != input_ids.shape or img_attention_mask.shape != img_feat.shape[:2]:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)} "
                         f"and img_attention_mask {tuple(img_attention_mask.shape)} img_feat's first two dims "
                         f"{tuple(img_feat.shape[:2])}")
    txt_lens, img_lens = attention_mask.long().sum(1), img_attention_mask.long().sum(1)
    return batch_from_padded(input_ids=input_ids, txt_lens=txt_lens, img_feat=img_feat, img_pos=img_pos,
                             img_lens=img_lens, img_masks=img_masks.bool() if img_masks is not None else None)
