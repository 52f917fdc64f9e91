"""The UNITER model, its pretraining heads and losses, and checkpoint conversion.

Names are imported on first use: the config and the command line read ``model.tasks`` without
loading torch and transformers."""

from __future__ import annotations

from .lazy import lazy_exports

_HOMES = {
    "conversion": ["LoadReport", "load_bert_weights", "load_original_state_dict", "to_original_state_dict"],
    "config": ["PRESETS", "UniterConfig"],
    "inputs": ["IGNORE_INDEX", "UniterBatch", "build_batch"],
    "kernels": ["active_kernels"],
    "modeling": ["TaskOutput", "UniterForPretraining", "UniterForSequenceClassification", "UniterModel",
                 "UniterOutput"],
    "ot": ["ipot_plan", "wra_distance"],
    "tasks": ["TASKS"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOMES, globals())
