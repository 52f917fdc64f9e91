"""The UNITER model, its pretraining heads and losses, and checkpoint conversion."""

from .checkpoint import LoadReport, load_bert_weights, load_original_state_dict, to_original_state_dict
from .config import PRESETS, UniterConfig
from .inputs import IGNORE_INDEX, UniterBatch, build_batch
from .kernels import active_kernels
from .modeling import (
    TASKS,
    TaskOutput,
    UniterForPretraining,
    UniterForSequenceClassification,
    UniterModel,
    UniterOutput,
)
from .ot import ipot_plan, wra_distance

__all__ = [
    "IGNORE_INDEX", "PRESETS", "TASKS", "LoadReport", "TaskOutput", "UniterBatch", "UniterConfig",
    "UniterForPretraining", "UniterForSequenceClassification", "UniterModel", "UniterOutput",
    "active_kernels", "build_batch", "ipot_plan",
    "load_bert_weights", "load_original_state_dict", "to_original_state_dict", "wra_distance",
]
