"""A job's datasets, resolved once at its start and handed on.

Resolving a dataset lists its shards and reads its manifest, over the network for a URL. ``uniter-ds
pretrain`` resolves every dataset before any rank starts (to fail early) and writes what it found to a
JSON file named by ``UNITER_DS_JOB_SOURCES``; rank 0 reads that file, or resolves the datasets itself
when started without it (torchrun, the ``deepspeed`` launcher directly), and sends the result to the
other ranks. The loaders and the evaluation then take these shards: a URL dataset's manifest is fetched
once per job start, not once per rank, stream and epoch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..data import DataError, check_compatible, resolve_sources
from ..data.reader import Shard, shards_from_json, shards_to_json
from ..model.tasks import needs_soft_labels
from .config import ExperimentConfig

JOB_SOURCES_ENV = "UNITER_DS_JOB_SOURCES"


@dataclass
class JobSources:
    train: dict[str, list[Shard]]  # training dataset name -> its shards
    val: list[Shard]  # the held-out set's shards (empty without one)


def dataset_keys(config: ExperimentConfig) -> list[tuple[str, str | None, list[str], dict[str, float]]]:
    """(config key, training dataset name or None for the held-out set, paths, tasks) of each dataset."""
    keys = [(f"data.train.{i}.paths", d.name, d.paths, d.tasks) for i, d in enumerate(config.data.train)]
    return keys + ([("data.val", None, config.data.val, {})] if config.data.val else [])


def check_against_model(config: ExperimentConfig, sources: JobSources, model_config: Any) -> None:
    """Refuse data that does not fit the model (feature sizes, vocabulary, soft labels for MRC), naming the
    dataset's config key: before any rank starts (the launcher) and at each rank's start."""
    for key, name, _, tasks in dataset_keys(config):
        shards = sources.val if name is None else sources.train[name]
        try:
            check_compatible(shards[0].manifest, source=str(shards[0].origin), img_dim=model_config.img_dim,
                             img_pos_dim=model_config.img_pos_dim, img_label_dim=model_config.img_label_dim,
                             vocab_size=model_config.vocab_size, need_soft_labels=needs_soft_labels(tasks))
        except DataError as error:
            raise DataError(f"config key '{key}': {error}") from None


def listed_sources(config: ExperimentConfig) -> dict:
    """The datasets as the config names them: what a resolution is valid for."""
    return {"train": {d.name: list(d.paths) for d in config.data.train}, "val": list(config.data.val)}


def resolve(config: ExperimentConfig) -> JobSources:
    return JobSources({d.name: resolve_sources(d.paths) for d in config.data.train},
                      resolve_sources(config.data.val) if config.data.val else [])


def to_json(config: ExperimentConfig, sources: JobSources) -> str:
    return json.dumps({"listed": listed_sources(config),
                       "train": {name: shards_to_json(shards) for name, shards in sources.train.items()},
                       "val": shards_to_json(sources.val)})


def from_json(config: ExperimentConfig, text: str, where: str) -> JobSources | None:
    """The resolution saved in ``text``, or None when it was made for other datasets."""
    data = json.loads(text)
    if data.get("listed") != listed_sources(config):
        return None
    return JobSources({name: shards_from_json(shards, where) for name, shards in data["train"].items()},
                      shards_from_json(data["val"], where))


def job_sources(config: ExperimentConfig) -> JobSources:
    """Every rank's view of the job's datasets, resolved once (module docstring)."""
    found: list[JobSources | str | None] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            saved = os.environ.get(JOB_SOURCES_ENV)
            if saved and Path(saved).is_file():
                found[0] = from_json(config, Path(saved).read_text(), saved)
            found[0] = found[0] or resolve(config)
        except DataError as error:  # every rank stops with the same message
            found[0] = str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], str):
        raise DataError(found[0])
    return found[0]
