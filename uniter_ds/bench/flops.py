"""Training FLOPs, as benchmarks/RESULTS.md and PERFORMANCE.md count them.

Per token of a sample of T tokens (text + regions, no padding): 6 N + 12 L d T, with N the
non-embedding parameters of the transformer layers (the matmuls every token goes through, forward
2N, backward 4N) and 12 L d T the attention score and value products (forward 4 L d T per token).
Embeddings, the pooler and the heads (which run on masked positions only) are left out, as in the
BERT/MFU literature. Recomputation (activation checkpointing) is not counted: that would be HFU.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..model import UniterConfig


def layer_parameters(config: UniterConfig) -> int:
    d, f = config.hidden_size, config.intermediate_size
    attention = 4 * d * d + 4 * d  # q, k, v, output projections with biases
    ffn = 2 * d * f + f + d
    norms = 2 * 2 * d
    return attention + ffn + norms


def non_embedding_parameters(config: UniterConfig) -> int:
    return config.num_hidden_layers * layer_parameters(config)


def training_flops_per_sample(config: UniterConfig, tokens: int) -> float:
    n = non_embedding_parameters(config)
    return tokens * (6 * n + 12 * config.num_hidden_layers * config.hidden_size * tokens)


def training_flops(config: UniterConfig, sample_tokens: Iterable[int]) -> float:
    """A batch: attention is per sample, so each sample counts with its own length."""
    return sum(training_flops_per_sample(config, t) for t in sample_tokens)
