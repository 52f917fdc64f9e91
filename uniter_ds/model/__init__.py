"""The UNITER model, its pretraining heads and losses, and checkpoint conversion.

Names are imported on first use: the config and the command line read ``model.tasks`` without
loading torch and transformers."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "checkpoint": ["LoadReport", "load_bert_weights", "load_original_state_dict", "to_original_state_dict"],
    "config": ["PRESETS", "UniterConfig"],
    "inputs": ["IGNORE_INDEX", "UniterBatch", "build_batch"],
    "kernels": ["active_kernels"],
    "modeling": ["TaskOutput", "UniterForPretraining", "UniterForSequenceClassification", "UniterModel",
                 "UniterOutput"],
    "ot": ["ipot_plan", "wra_distance"],
    "tasks": ["TASKS"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
