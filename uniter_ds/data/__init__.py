"""The data path: WebDataset shards of region features and captions -> task batches.

Names are imported on first use: the converters and their worker processes need numpy and the
databases, not torch (importing torch costs seconds per spawned process)."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "batching": ["TASKS", "TaskSample", "TaskTransform", "budget_batches", "collate", "mask_regions", "mask_text"],
    "format": ["DataError", "Manifest", "TokenizerInfo", "check_compatible", "positions_from_boxes",
               "positions_from_norm_bb"],
    "loader": ["LoaderStats", "TaskStream", "build_loader"],
    "loader_config": ["LoaderConfig", "LoaderSettings"],
    "reader": ["ImageRecord", "Pair", "ReaderStats", "read_shard", "resolve_sources"],
    "synth": ["synth_dataset"],
    "writer": ["DatasetWriter"],
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
