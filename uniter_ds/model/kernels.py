"""Kernel selection: which LayerNorm and attention implementation the model runs on.

apex's FusedLayerNorm is used when apex is importable and a CUDA device is present (it has no CPU
path); torch's LayerNorm otherwise. ``UNITER_DS_LAYER_NORM=torch`` forces torch's, ``=apex`` requires
apex (an error when it cannot be used). Both keep the
parameter names ``weight`` and ``bias``, so checkpoints do not depend on the choice.
Attention always goes through ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks
the backend (flash / memory-efficient / cuDNN / math) per call; ``sdpa_backend("math")`` etc.
restricts it (benchmarks compare backends) and :func:`attention_backend` says which one runs for the
model's own attention call (boolean key mask, attention dropout while training). FlashAttention takes
no mask, so it never runs UNITER's padded batches; cuDNN's refuses a dropout of 0.1 on the PyTorch
versions seen so far. Asking for a backend that cannot run the model is an error up front.
"""

from __future__ import annotations

import contextlib
import os
import warnings
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


def attention_backend(num_heads: int, head_dim: int, dropout: float, device: torch.device | str,
                      dtype: torch.dtype, backend: str = "auto", packed: bool = False, nested: bool = False) -> str:
    """The SDPA backend PyTorch picks for the model's attention call (boolean key mask with padding, or
    the packed layout's block-diagonal [L, L] mask; ``dropout``) on ``device`` in ``dtype``, under the
    ``backend`` restriction; a ValueError naming the backend when it cannot run that call. Shapes do not
    change the choice between these backends for head_dim <= 256, so a small call stands in for the
    real ones. ``nested``: the packed layout's jagged sequences, which take no mask: on CUDA the
    backend chosen for unmasked attention (flash where it can), elsewhere the math path per sample."""
    from torch.nn.attention import SDPBackend

    if nested and torch.device(device).type != "cuda":
        return "math (nested, per sample)"

    q = torch.zeros(2, num_heads, 8, head_dim, device=device, dtype=dtype)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool, device=device)
    mask[1, ..., 5:] = False  # a padded sample, as in every token-budget batch
    if nested:
        mask = None
    elif packed:  # two samples in a row: a block diagonal
        segments = torch.tensor([0, 0, 0, 1, 1, 1, 1, -1], device=device)
        mask = (segments[:, None] == segments[None, :]).expand(2, 1, 8, 8)
    with sdpa_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns once per refused backend; the error below says it
        try:
            choice = torch._fused_sdp_choice(q, q, q, mask, dropout)
        except RuntimeError as error:
            raise ValueError(
                f"SDPA backend {backend!r} cannot run UNITER's attention on {torch.device(device).type} in "
                f"{str(dtype).replace('torch.', '')} with a {'packed' if packed else 'key'} mask and dropout "
                f"{dropout}: "
                f"{str(error).split('.')[0]}. Use auto (PyTorch picks a backend that can), or math") from None
    name = {SDPBackend.MATH: "math", SDPBackend.FLASH_ATTENTION: "flash",
            SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.CUDNN_ATTENTION: "cudnn"}.get(
        SDPBackend(choice), SDPBackend(choice).name.lower())
    return f"{name} (nested)" if nested else name


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
