"""Kernel selection: which LayerNorm and attention implementation the model runs on.

apex's FusedLayerNorm is used when apex is importable and a CUDA device is present (it has no CPU
path); torch's LayerNorm otherwise. ``UNITER_DS_LAYER_NORM=torch`` forces torch's, ``=apex`` requires
apex (an error when it cannot be used). Both keep the
parameter names ``weight`` and ``bias``, so checkpoints do not depend on the choice.
Attention always goes through ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks
the backend (flash / memory-efficient / cuDNN / math) per call, and ``sdpa_backends`` reports which
ones are enabled; ``sdpa_backend("math")`` etc. restricts it (benchmarks compare backends).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import cache

import torch
from torch import nn


@cache
def _apex_fused_layer_norm() -> type[nn.Module] | None:
    choice = os.environ.get("UNITER_DS_LAYER_NORM", "auto")
    if choice not in ("auto", "torch", "apex"):
        raise ValueError(f"UNITER_DS_LAYER_NORM={choice!r}: expected auto, torch or apex")
    if choice == "torch":
        return None
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        FusedLayerNorm = None
    if choice == "apex" and (FusedLayerNorm is None or not torch.cuda.is_available()):
        raise ValueError("UNITER_DS_LAYER_NORM=apex: apex's FusedLayerNorm needs apex installed and a CUDA device")
    return FusedLayerNorm if torch.cuda.is_available() else None


def layer_norm(hidden_size: int, eps: float) -> nn.Module:
    fused = _apex_fused_layer_norm()
    if fused is not None:
        return fused(hidden_size, eps=eps)
    return nn.LayerNorm(hidden_size, eps=eps)


SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to one backend (``auto``: PyTorch chooses)."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if name not in backends:
        raise ValueError(f"SDPA backend {name!r}: expected auto or one of {', '.join(backends)}")
    with sdpa_kernel(backends[name]):
        yield


def sdpa_backends() -> list[str]:
    if not torch.cuda.is_available():
        # CPU: a flash kernel without dropout, the math path (matmul + softmax) with it.
        return ["flash (cpu, without attention dropout)", "math (cpu)"]
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
