"""The data path: WebDataset shards of region features and captions -> task batches."""

from .batching import TASKS, TaskSample, TaskTransform, budget_batches, collate, mask_regions, mask_text
from .format import DataError, Manifest, TokenizerInfo, check_compatible, positions_from_boxes, positions_from_norm_bb
from .loader import LoaderConfig, LoaderStats, TaskStream, build_loader
from .reader import ImageRecord, Pair, ReaderStats, read_shard, resolve_sources
from .synth import synth_dataset
from .writer import DatasetWriter

__all__ = [
    "TASKS", "DataError", "DatasetWriter", "ImageRecord", "LoaderConfig", "LoaderStats", "Manifest", "Pair",
    "ReaderStats", "TaskSample", "TaskStream", "TaskTransform", "TokenizerInfo", "budget_batches", "build_loader",
    "check_compatible", "collate", "mask_regions", "mask_text", "positions_from_boxes", "positions_from_norm_bb",
    "read_shard", "resolve_sources", "synth_dataset",
]
