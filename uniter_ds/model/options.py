"""The encoder's training options, which of them combine, and applying them to a model.

:func:`option_problems` is the one place that decides which combinations are refused: the experiment
config (at load and with its DeepSpeed file), ``uniter-ds pretrain`` before any rank starts, and
``uniter-ds bench`` all ask it. Plain Python at import (torch is imported where a rule needs it), so
the config and the command line stay light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

PACKED_ATTENTION_FORMS = ("auto", "nested", "mask", "buckets")  # attention.py says what each is


@dataclass(frozen=True)
class ModelOptions:
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the encoder layers and WRA's IPOT loop (acceleration.py)
    packed_attention: str = "auto"  # the packed layout's attention form
    cuda_graphs: bool = False  # replay the encoder's layers from CUDA graphs (acceleration.py)


def option_problems(options: ModelOptions, *, batching: str | None = None,
                    zero_optimization: dict[str, Any] | None = None,
                    cuda_available: bool | None = None) -> list[tuple[str, str]]:
    """(config key, why) for each refused setting or combination. What the caller does not know yet is
    passed as None and not judged: the data batching (``data.batching``), the DeepSpeed file's
    ``zero_optimization``, whether a CUDA GPU is visible."""
    found: list[tuple[str, str]] = []
    if options.packed_attention not in PACKED_ATTENTION_FORMS:
        found.append(("model.packed_attention",
                      f"{options.packed_attention!r} is not one of {list(PACKED_ATTENTION_FORMS)}"))
    zero_stage = (zero_optimization or {}).get("stage", 0)
    if options.cuda_graphs:
        if batching is not None and batching != "rows":
            found.append(("model.cuda_graphs", "needs one encoder shape per run: set data.layout: packed and "
                                               "data.batching: rows"))
        if options.packed_attention in ("nested", "buckets"):
            found.append(("model.cuda_graphs", f"the {options.packed_attention} attention's shapes change with every "
                                               "batch, a graph replays one shape: set model.packed_attention: mask "
                                               "or auto"))
        if options.activation_checkpointing:
            found.append(("model.cuda_graphs", "not with model.activation_checkpointing: a graph cannot replay "
                                               "its recomputation"))
        if options.compile:
            found.append(("model.cuda_graphs", "not with model.compile: compile makes graphs of its own"))
        if zero_stage == 3:
            found.append(("model.cuda_graphs", "not with ZeRO-3: its hooks gather and release each layer's "
                                               "parameters inside the forward, which a graph cannot replay"))
        if cuda_available is False:
            found.append(("model.cuda_graphs", "CUDA graphs need a CUDA GPU, and none is visible here"))
    if options.compile and zero_stage == 3 and (problem := _acceleration().zero3_compile_problem(zero_optimization)):
        found.append(("model.compile", problem))  # torch's version decides
    return found


def apply_options(model: Any, options: ModelOptions) -> None:
    """Set ``options`` on a :class:`UniterForPretraining` (or a model with its ``uniter`` encoder), before
    DeepSpeed wraps it."""
    acceleration = _acceleration()
    encoder = model.uniter.encoder
    encoder.activation_checkpointing = options.activation_checkpointing
    encoder.packed_attention = options.packed_attention
    if options.compile:
        if hasattr(model, "ipot"):
            acceleration.compile_for_training(model)
        else:
            acceleration.compile_layers(encoder)
    if options.cuda_graphs:
        acceleration.use_cuda_graphs(encoder)


def _acceleration() -> Any:
    # Imported by name when needed: torch stays out of the config's imports, and an export (which ships
    # this file with attention.py) does not ship the compile and CUDA-graph machinery.
    return importlib.import_module(".acceleration", __package__)
