"""Kernel selection: which LayerNorm and attention implementation the model runs on.

apex's FusedLayerNorm is used when apex is importable and a CUDA device is present (it has no CPU
path); torch's LayerNorm otherwise. ``UNITER_DS_LAYER_NORM=torch`` forces torch's. Both keep the
parameter names ``weight`` and ``bias``, so checkpoints do not depend on the choice.
Attention always goes through ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks
the backend (flash / memory-efficient / cuDNN / math) per call, and ``sdpa_backends`` reports which
ones are enabled.
"""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import nn


@cache
def _apex_fused_layer_norm() -> type[nn.Module] | None:
    if os.environ.get("UNITER_DS_LAYER_NORM", "auto") == "torch" or not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return None
    return FusedLayerNorm


def layer_norm(hidden_size: int, eps: float) -> nn.Module:
    fused = _apex_fused_layer_norm()
    if fused is not None:
        return fused(hidden_size, eps=eps)
    return nn.LayerNorm(hidden_size, eps=eps)


def sdpa_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["math (cpu)"]
    flags = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
    }
    return [name for name, enabled in flags.items() if enabled]


def active_kernels(model: nn.Module | None = None) -> dict[str, str]:
    """Names of the kernels in use; with a model, read off its modules rather than the defaults."""
    if model is not None:
        norms = {type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                 if type(m).__name__ in ("LayerNorm", "FusedLayerNorm")}
        layer_norm_name = ", ".join(sorted(norms)) or "none"
    else:
        layer_norm_name = "apex.normalization.FusedLayerNorm" if _apex_fused_layer_norm() else \
            "torch.nn.LayerNorm"
    return {
        "layer_norm": layer_norm_name,
        "attention": "torch.nn.functional.scaled_dot_product_attention [" + ", ".join(sdpa_backends()) + "]",
        "gelu": "torch.nn.functional.gelu (erf)",
    }
