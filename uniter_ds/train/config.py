"""The experiment config: one YAML (or JSON) file, typed dataclasses, validated at load.

An unknown key or a value of the wrong type is an error naming the key by its dotted path
(``optim.lr``, ``data.train.0.tasks``). ``--set key=value`` overrides go through the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.loader_config import LoaderSettings
from ..model.options import ModelOptions, option_problems
from ..model.tasks import TASKS


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    preset: str = "base"  # tiny | base | large
    config_file: str | None = None  # a UNITER json config instead of the preset
    overrides: dict[str, Any] = field(default_factory=dict)  # UniterConfig fields over the preset
    # Initial weights: "bert:FOLDER" (HF BERT, as the paper), "uniter:FILE.pt" (original layout),
    # "hf:FOLDER" (a folder from save_pretrained / export). None: random init.
    init_from: str | None = None
    wra_weight: float = 0.1
    # MRC-kl objective: "original" (the reference's: KL averaged over regions and classes) or
    # "per_region" (each region's whole KL; 1601x larger against the other tasks on real features).
    mrc_kl: str = "original"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the encoder layers and WRA's IPOT loop (dynamic shapes)
    # The packed layout's attention: "nested" (a jagged nested tensor, one sequence per sample: nothing
    # computed across samples), "mask" (dense rows, block-diagonal mask: one shape, for CUDA graphs),
    # "buckets" (the samples gathered into buckets of similar length: the fastest on CPU) or "auto"
    # (GPU: nested, mask under CUDA graphs; CPU: buckets).
    packed_attention: str = "auto"
    # Replay the encoder's layers from CUDA graphs (GPU; one shape per run: data.batching rows).
    cuda_graphs: bool = False

    def options(self) -> ModelOptions:
        return ModelOptions(activation_checkpointing=self.activation_checkpointing, compile=self.compile,
                            packed_attention=self.packed_attention, cuda_graphs=self.cuda_graphs)

    def uniter_config(self):  # -> UniterConfig (imported here: the config module stays light)
        """The model's configuration: the preset or the json file, with the overrides over it."""
        from ..model import UniterConfig

        if self.config_file:
            config = UniterConfig.from_json_file(self.config_file)
            return UniterConfig.from_dict(config.to_dict() | self.overrides) if self.overrides else config
        return UniterConfig.from_preset(self.preset, **self.overrides)


@dataclass
class TrainDataset:
    name: str
    paths: list[str]  # dataset folders or shard globs
    tasks: dict[str, float]  # task -> mix ratio, e.g. {itm: 3, mlm: 4, mrfr: 2, mrc-kl: 2}


@dataclass
class DataSection(LoaderSettings):
    """The loader's settings (data/loader_config.py: token budget, split, workers, masking, layout, ...)
    and what the run does with its datasets."""

    train: list[TrainDataset] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    # How a resumed run finds its place in the data: "exact" restores each loader worker from its saved
    # place (the same batches as an uninterrupted run, at the same cost at any step); "replay" re-reads
    # the batches already used (exact, cost grows with the step); "reseed" starts fresh streams.
    resume: str = "exact"
    # Stop when more than this share of the images read were skipped (bad samples) or lost (corrupt or
    # truncated shards); judged from 1,000 images on and at the end. 0 stops at the first one under skip.
    max_skip_fraction: float = 0.05


@dataclass
class OptimSection:
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 10000
    total_steps: int = 200000
    grad_clip: float = 5.0
    grad_accum: int = 1
    # AdamW implementation: "torch" (torch's fused AdamW, CUDA or CPU, nothing to build) or
    # "deepspeed" (DeepSpeed's FusedAdam, CUDA only, compiled by nvcc at first use).
    implementation: str = "torch"


@dataclass
class EvalSection:
    every: int = 1000  # steps; 0 = only at the end
    batches: int = 20  # per task
    retrieval_images: int = 50  # images (x their first caption) scored all-against-all by ITM
    at_end: bool = True


@dataclass
class CheckpointSection:
    every: int = 1000  # steps; 0 = only at the end
    keep_last: int = 3
    at_end: bool = True


@dataclass
class TrackingSection:
    mlflow: bool = True
    experiment: str = "uniter-ds"
    tracking_uri: str | None = None  # default: sqlite in the run directory; MLFLOW_TRACKING_URI wins
    log_every: int = 10
    progress_bar: bool = True  # on a TTY; plain log lines otherwise
    # CPU / memory / GPU utilisation sampled by MLflow's monitor every this many seconds; 0 = off.
    system_metrics_interval: float = 10.0


@dataclass
class ExperimentConfig:
    run_dir: str = "runs/uniter"
    seed: int = 42
    deepspeed_config: str = "ds_configs/zero2_bf16.json"
    task_draw: str = "step"  # draw the task per optimizer "step" or per "micro_batch"
    stop_at_step: int | None = None  # stop early (the LR schedule still follows optim.total_steps)
    export_at_end: bool = True
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key {key!r}: {why}")

        choices = {"task_draw": (self.task_draw, ("step", "micro_batch")),
                   "data.resume": (self.data.resume, ("exact", "replay", "reseed")),
                   "optim.implementation": (self.optim.implementation, ("torch", "deepspeed")),
                   "model.preset": (self.model.preset, ("tiny", "base", "large")),
                   "model.mrc_kl": (self.model.mrc_kl, ("original", "per_region"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise bad(key, f"{value!r} is not one of {list(allowed)}")
        for key, why in self.data.problems():
            raise bad(f"data.{key}", why)
        if not self.data.train:
            raise bad("data.train", "at least one training dataset is needed")
        for i, dataset in enumerate(self.data.train):
            if not dataset.paths:
                raise bad(f"data.train.{i}.paths", "empty")
            if not dataset.tasks:
                raise bad(f"data.train.{i}.tasks", "empty")
            for task, ratio in dataset.tasks.items():
                if task not in TASKS:
                    raise bad(f"data.train.{i}.tasks.{task}", f"unknown task; choose from {list(TASKS)}")
                if ratio <= 0:
                    raise bad(f"data.train.{i}.tasks.{task}", f"mix ratio must be > 0, got {ratio}")
        names = [d.name for d in self.data.train]
        if len(set(names)) != len(names):
            raise bad("data.train", f"dataset names must be unique, got {names}")
        positive = {"optim.lr": self.optim.lr, "optim.total_steps": self.optim.total_steps,
                    "optim.grad_accum": self.optim.grad_accum, "tracking.log_every": self.tracking.log_every,
                    "eval.batches": self.eval.batches}
        for key, value in positive.items():
            if value <= 0:
                raise bad(key, f"must be > 0, got {value}")
        non_negative = {"optim.warmup_steps": self.optim.warmup_steps, "optim.weight_decay": self.optim.weight_decay,
                        "optim.grad_clip": self.optim.grad_clip, "eval.every": self.eval.every,
                        "checkpoint.every": self.checkpoint.every}
        for key, value in non_negative.items():
            if value < 0:
                raise bad(key, f"must be >= 0, got {value}")
        for key, why in option_problems(self.model.options(), batching=self.data.batching):
            raise bad(key, why)
        if not 0 <= self.data.max_skip_fraction <= 1:
            raise bad("data.max_skip_fraction", f"a share in [0, 1], got {self.data.max_skip_fraction}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise bad("optim.betas", f"two numbers in [0, 1), got {self.optim.betas}")
        if self.checkpoint.keep_last < 1:
            raise bad("checkpoint.keep_last", f"must be >= 1, got {self.checkpoint.keep_last}")
        if self.model.init_from is not None and self.model.init_from.split(":", 1)[0] not in ("bert", "uniter", "hf"):
            raise bad("model.init_from", f"{self.model.init_from!r}: expected bert:PATH, uniter:PATH or hf:PATH")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, str]:
        """Dotted keys -> string values (MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                out[prefix] = json.dumps(value) if not isinstance(value, str) else value

        walk("", self.to_dict())
        return out


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting where YAML is loose (int for float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for candidate in (a for a in args if a is not type(None)):
            try:
                return _convert(value, candidate, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {annotation}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return build(annotation, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-5" as a string
        except ValueError:
            pass
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(f"config key {key!r}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"config key {path!r} is unknown; known keys here: {sorted(known)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value``: the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    path, text = assignment.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    node: Any = raw
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {path}: {'.'.join(parts[:i + 1])} is not an index of the list")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {path}: {last} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        text = path.read_text()
        raw = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        config = build(ExperimentConfig, raw)
        config.validate()
    except ConfigError as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None
    return config


def check_with_deepspeed(config: ExperimentConfig, ds: dict[str, Any], path: str | Path) -> None:
    """What the experiment config refuses given its DeepSpeed file (``path``, read into ``ds``)."""
    zero = ds.get("zero_optimization", {})
    for key, why in option_problems(config.model.options(), batching=config.data.batching, zero_optimization=zero):
        raise ConfigError(f"config key {key!r} with {path}: {why}")
