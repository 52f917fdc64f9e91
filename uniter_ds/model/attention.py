"""Self-attention and the packed layout's three ways of keeping each sample to itself.

The padded layout attends with a boolean key mask. Packed rows (several samples per row, model/inputs.py)
attend in one of three forms, each computing no score across two samples or only masked ones:

- ``nested``: one jagged nested tensor, a sequence per sample; CUDA runs variable-length kernels.
- ``mask``: dense rows with a block-diagonal mask; one shape per run, which CUDA graphs need.
- ``buckets``: each sample's queries, keys and values gathered into buckets of similar length
  (:class:`LengthBuckets`); the fastest on CPU, but it reads the lengths on the host.

``auto`` resolves to nested on a GPU (mask under CUDA graphs) and buckets elsewhere
(benchmarks/RESULTS.md measures each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UniterConfig
from .inputs import UniterBatch
from .options import PACKED_ATTENTION_FORMS


def resolve_packed_attention(setting: str, on_cuda: bool, cuda_graphs: bool) -> str:
    """The form ``setting`` (one of PACKED_ATTENTION_FORMS) runs as on this device."""
    if setting not in PACKED_ATTENTION_FORMS:
        raise ValueError(f"packed_attention {setting!r}: expected {', '.join(PACKED_ATTENTION_FORMS[:-1])} "
                         f"or {PACKED_ATTENTION_FORMS[-1]}")
    if setting == "auto":
        return ("mask" if cuda_graphs else "nested") if on_cuda else "buckets"
    return setting


class LengthBuckets(NamedTuple):
    """The packed rows' attention run on the samples themselves: each sample's queries, keys and values
    gathered from the rows into a bucket of samples padded to the same multiple of ``BUCKET_TOKENS``, one
    attention call per bucket, the context scattered back into the rows. No score across samples, and
    ~1.3x the samples' own scores where the dense mask computes ~3.5x (rows of 256)."""

    gathers: tuple[Tensor, ...]  # per bucket [n, Lb]: each token's flat row position (0 past a sample's end)
    key_masks: tuple[Tensor, ...]  # per bucket [n, 1, 1, Lb]: True on each sample's tokens
    scatter: Tensor  # [R * Lr]: each row slot's position in the buckets' outputs, concatenated (empty slots: 0)


BUCKET_TOKENS = 32


def length_buckets(unpack_index: Tensor, lengths: Sequence[int], row_slots: int) -> LengthBuckets:
    """:class:`LengthBuckets` for a packed batch: ``unpack_index`` [B, L] (each compact position's flat row
    position), the samples' ``lengths`` (host integers: built on the host, then moved to the index's device)."""
    device = unpack_index.device
    by_length: dict[int, list[int]] = {}
    for sample, length in enumerate(lengths):
        by_length.setdefault(min(-(-length // BUCKET_TOKENS) * BUCKET_TOKENS, unpack_index.size(1)), []).append(sample)
    gathers, key_masks, scatter, start = [], [], torch.zeros(row_slots, dtype=torch.long, device=device), 0
    for bucket_length, samples in sorted(by_length.items()):
        within = (torch.arange(bucket_length)[None] < torch.tensor([lengths[i] for i in samples])[:, None]).to(device)
        gather = unpack_index[torch.tensor(samples, device=device), :bucket_length] * within
        outputs = start + torch.arange(within.numel(), device=device).view_as(within)
        scatter[gather[within]] = outputs[within]
        gathers.append(gather)
        key_masks.append(within[:, None, None, :])
        start += within.numel()
    return LengthBuckets(tuple(gathers), tuple(key_masks), scatter)


@torch.compiler.disable  # its shapes and its number of calls change with every batch: no graph to reuse
def bucketed_attention(qkv: Tensor, buckets: LengthBuckets, num_heads: int, dropout: float) -> Tensor:
    """``qkv`` [R * Lr, 3H] of the flattened rows -> the context [R * Lr, H], each sample attending within itself."""
    hidden = qkv.size(-1) // 3
    contexts = []
    for gather, key_mask in zip(buckets.gathers, buckets.key_masks):
        count, length = gather.shape
        q, k, v = qkv[gather].view(count, length, 3, num_heads, hidden // num_heads).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        contexts.append(context.transpose(1, 2).reshape(count * length, hidden))
    return torch.cat(contexts)[buckets.scatter]


class SelfAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # fused query, key, value
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, key_mask: Tensor | LengthBuckets) -> Tensor:
        """``key_mask``: a boolean mask SDPA broadcasts over the scores; or, for packed rows, the offsets
        of the sequences in the flattened rows (each attends within itself, as a jagged nested tensor), or
        :class:`LengthBuckets`."""
        batch, length, hidden = x.shape
        dropout = self.attention_dropout if self.training else 0.0
        if isinstance(key_mask, LengthBuckets):
            context = bucketed_attention(self.qkv(x).flatten(0, 1), key_mask, self.num_heads, dropout)
            return self.out(context.view(batch, length, hidden))
        if key_mask.dim() == 1:
            # Sequence-length bounds given, not measured: measuring them reads the offsets on the host (a sync).
            # No sequence is empty (the offsets skip empty row tails) or longer than a row.
            qkv = self.qkv(x).view(batch * length, 3, self.num_heads, self.head_dim)
            q, k, v = (torch.nested.nested_tensor_from_jagged(t.contiguous(), key_mask, min_seqlen=1, max_seqlen=length)
                       .transpose(1, 2) for t in qkv.unbind(1))
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).transpose(1, 2).values()
            return self.out(context.reshape(batch, length, hidden))
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        return self.out(context.transpose(1, 2).reshape(batch, length, hidden))


def packed_key_mask(batch: UniterBatch, form: str) -> Tensor | LengthBuckets:
    """What the attention of packed rows is given to keep each token within its sample, in ``form``."""
    if form == "nested":
        return batch.pack_offsets
    if form == "mask":
        return batch.pack_segments.unsqueeze(2) == batch.pack_segments.unsqueeze(1)
    if form == "buckets":
        return length_buckets(batch.unpack_index, (batch.txt_lens + batch.img_lens).tolist(), batch.pack_index.numel())
    raise ValueError(f"packed_attention {form!r}: expected nested, mask or buckets")
