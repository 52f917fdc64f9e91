"""How the encoder runs faster without changing what it computes: ``torch.compile`` and CUDA graphs.

Kept out of the model file (modeling.py reads as the architecture) and out of exports (nothing in
modeling.py imports this module). :func:`uniter_ds.model.options.apply_options` applies these from a
config; which options combine is decided there.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modeling import Encoder, UniterForPretraining

# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

# torch.compile of an autograd.Function whose forward changes a tensor in place gives wrong gradients
# on torch 2.11 (pytorch/pytorch#180642; benchmarks/compile_check.py's -zero3-linear variant: wrong on
# 2.11.0, right on 2.12.1 and 2.13.0). Our layers hold no such function, but DeepSpeed's ZeRO-3 makes one
# torch.nn.functional.linear for the whole process (zero_optimization.memory_efficient_linear, on by
# default): its forward adds the bias in place.
TORCH_WITH_INPLACE_FUNCTION_BUG = (2, 11)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


ZERO3_LINEAR_REMEDY = ("set \"memory_efficient_linear\": false under zero_optimization in the DeepSpeed config "
                       "(DeepSpeed's ZeRO-3 linear then stays out of torch.nn.functional), or train without "
                       "model.compile / --compile")


def zero3_compile_problem(zero_optimization: dict[str, Any]) -> str | None:
    """Why compiled layers would train with wrong gradients under a DeepSpeed config's ``zero_optimization``
    on this torch, or None."""
    if (zero_optimization.get("stage", 0) != 3 or not zero_optimization.get("memory_efficient_linear", True)
            or torch_version() != TORCH_WITH_INPLACE_FUNCTION_BUG):
        return None
    return (f"torch.compile with ZeRO-3 on torch {torch.__version__}: DeepSpeed's ZeRO-3 linear compiles with "
            f"wrong gradients there (pytorch/pytorch#180642); {ZERO3_LINEAR_REMEDY}")


def compiled_linear_problem() -> str | None:
    """Why compiled layers would train with wrong gradients in this process, or None."""
    zero3_linear = sys.modules.get("deepspeed.runtime.zero.linear")  # imported by DeepSpeed, never here
    if (zero3_linear is None or F.linear is not getattr(zero3_linear, "zero3_linear_wrap", None)
            or torch_version() != TORCH_WITH_INPLACE_FUNCTION_BUG):  # every compiled forward asks: cheapest first
        return None
    return ("torch.nn.functional.linear is DeepSpeed's ZeRO-3 linear in this process, and torch "
            f"{torch.__version__} compiles it with wrong gradients (pytorch/pytorch#180642); {ZERO3_LINEAR_REMEDY}")


def _refuse_wrong_compiled_linear(_encoder: nn.Module, _inputs: tuple) -> None:
    if problem := compiled_linear_problem():
        raise RuntimeError(problem)


def compile_layers(encoder: Encoder) -> None:
    """``torch.compile`` each layer in place (parameter names unchanged) with dynamic shapes: the
    token-budget batches change length every step, and one graph per layer serves them all. The
    encoder then refuses to run where compiled layers would train wrong (:func:`compiled_linear_problem`:
    torch 2.11 with DeepSpeed's ZeRO-3 linear)."""
    if getattr(encoder, "compiled", False):
        return
    for layer in encoder.layers:
        layer.compile(dynamic=True)
    encoder.register_forward_pre_hook(_refuse_wrong_compiled_linear)
    encoder.compiled = True


def compile_for_training(model: UniterForPretraining) -> None:
    """``torch.compile`` the encoder layers (:func:`compile_layers`) and WRA's IPOT loop (ot.py: ~450
    launches per ITM micro-batch eagerly)."""
    compile_layers(model.uniter.encoder)
    model.ipot["compiled"] = True


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------

MAX_GRAPHED_SHAPES = 4


class _LayerStack(nn.Module):
    """The encoder's layers as one module to capture in a CUDA graph (holding the encoder's own
    ModuleList, so the parameters keep their names in the encoder's state dict)."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class CudaGraphedLayers:
    """The encoder's layer stack replayed, forward and backward, from CUDA graphs captured at the first
    training step of each input shape (``torch.cuda.make_graphed_callables``): one replay each way
    instead of ~40 kernel launches per layer. At most ``MAX_GRAPHED_SHAPES`` shapes are captured;
    others run eagerly (with a warning). Held by the encoder as ``encoder.graphs``; not a module, so
    it adds nothing to the state dict."""

    device_type = "cuda"  # where captured graphs replay (tests/test_packed.py stands a CPU in for it)

    def __init__(self, layers: nn.ModuleList):
        self.stack = _LayerStack(layers)
        self.captured: dict[tuple, Any] = {}  # input shapes -> the layer stack replayed from CUDA graphs
        self.eager_shapes: set[tuple] = set()  # shapes beyond MAX_GRAPHED_SHAPES

    def __call__(self, x: Tensor, key_mask: Tensor) -> Tensor | None:
        """The layers' output replayed from a graph, or None where this shape runs eagerly."""
        if x.device.type != self.device_type:
            return None
        key = (tuple(x.shape), x.dtype, tuple(key_mask.shape), key_mask.dtype, x.device)
        replay = self.captured.get(key)
        if replay is None and len(self.captured) < MAX_GRAPHED_SHAPES:
            sample = (x.detach().requires_grad_(x.requires_grad), key_mask)
            replay = self.captured[key] = torch.cuda.make_graphed_callables(self.stack, sample)
        elif replay is None and key not in self.eager_shapes:
            self.eager_shapes.add(key)
            warnings.warn(f"CUDA graphs: {MAX_GRAPHED_SHAPES} input shapes captured already; {key[0]} runs eagerly, "
                          f"as every further shape (data.batching: rows gives one shape per run)", stacklevel=4)
        return None if replay is None else replay(x, key_mask)


def use_cuda_graphs(encoder: Encoder) -> None:
    """Training steps replay the encoder's layers from CUDA graphs (:class:`CudaGraphedLayers`). Meant for
    one shape per run, the packed layout's row-filling batcher (``data.batching: rows``). Evaluation runs
    eagerly.

    Dropout works (CUDA graphs draw fresh random numbers on each replay) but not with the eager path's
    numbers: capture runs three warm-up passes that advance the generator. Each parameter gradient is
    copied out of the graph's static buffer (a hook): the buffer is overwritten by the next replay, and
    gradient accumulation into an aliased ``.grad`` would double-count (pytorch/pytorch#181723). Not with
    activation checkpointing or ZeRO-3 (their hooks re-enter the layers' forward, which a graph cannot)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs (model.cuda_graphs / --cuda-graphs) need a CUDA GPU; none is visible")
    if encoder.activation_checkpointing:
        raise RuntimeError("CUDA graphs cannot replay activation checkpointing's recomputation: turn one off")
    if encoder.packed_attention in ("nested", "buckets"):
        raise RuntimeError(f"CUDA graphs replay one shape; the {encoder.packed_attention} attention's shapes change "
                           "with every batch: use the mask form (model.packed_attention: mask or auto)")
    if encoder.graphs is None:
        for parameter in encoder.layers.parameters():
            parameter.register_hook(torch.clone)
        encoder.graphs = CudaGraphedLayers(encoder.layers)
