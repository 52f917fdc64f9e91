"""The data path: WebDataset shards of region features and captions -> task batches.

Names are imported on first use: the converters and their worker processes need numpy and the
databases, not torch (importing torch costs seconds per spawned process)."""

from __future__ import annotations

from ..model.lazy import lazy_exports

_HOMES = {
    "batching": ["TaskSample", "TaskTransform", "budget_batches", "collate", "mask_regions", "mask_text"],
    "format": ["DataError", "Manifest", "TokenizerInfo", "check_compatible", "positions_from_boxes",
               "positions_from_norm_bb"],
    "loader": ["LoaderStats", "StreamDataset", "build_loader"],
    "loader_config": ["LoaderConfig", "LoaderSettings"],
    "reader": ["ImageRecord", "Pair", "ReaderStats", "read_shard", "resolve_sources"],
    "synth": ["synth_dataset"],
    "writer": ["DatasetWriter"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _HOMES, globals())
