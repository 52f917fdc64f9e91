"""Experiment tracking on rank 0: a plain ``metrics.jsonl`` that is always written (the record of truth),
and MLflow (an embedded SQLite store in the run directory by default).

What a run records in MLflow: the flattened config as params; tags for the code (git commit, dirty
flag), the packages (torch, CUDA, deepspeed, transformers, mlflow) and the device; every dataset as an
MLflow input (name, source path, the digest of its manifest, context train/validation) with its
manifest as an artifact; system metrics (CPU, memory, GPU where ``pynvml`` is installed) sampled by
MLflow's own monitor; the metrics; the export.

A tracking backend that fails does not stop training, and is not given up: the failed call and every
later one wait, in order, in a bounded queue, and are retried with exponential backoff (5 s doubling
to 5 min); when a retry succeeds the queue is delivered and the outage is logged with its length.
Failures, late deliveries and calls dropped from a full queue are counted (:attr:`Tracker.stats`, in
the run's result.json); a dropped metric is still in metrics.jsonl.

A resumed run (``resume_step``) continues the record: metrics.jsonl loses the lines after the step it
resumes from (they are logged again), and the MLflow run whose id ``mlflow_run.json`` in the run
directory keeps is reopened (MLflow cannot delete metric points: its history shows both values of
the steps between the checkpoint and the interruption).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..provenance import device_name, git_commit, git_dirty, package_versions

if TYPE_CHECKING:
    import torch

    from ..data.reader import Shard
    from .checkpointing import Start
    from .config import ExperimentConfig

logger = logging.getLogger(__name__)


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, use_mlflow: bool, experiment: str,
                 tracking_uri: str | None, run_name: str, system_metrics_interval: float | None = None,
                 max_pending: int = 10_000, backoff: tuple[float, float] = (5.0, 300.0),
                 clock: Callable[[], float] = time.monotonic, resume_step: int | None = None):
        self.enabled = enabled
        self.metrics_file = run_dir / "metrics.jsonl"
        self._logged_params: dict[str, str] = {}  # a reopened run's: MLflow refuses to change a param
        self.mlflow = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.stats = {"failures": 0, "outages": 0, "delivered_late": 0, "dropped": 0}
        self._pending: deque[tuple[str, tuple, dict]] = deque()
        self._max_pending = max_pending
        self._backoff_first, self._backoff_max = backoff
        self._backoff = self._backoff_first
        self._retry_at: float | None = None  # set while the backend is down
        self._down_since: float | None = None
        self._clock = clock
        if enabled and resume_step is not None:
            keep_steps_up_to(self.metrics_file, resume_step)
        if not enabled or not use_mlflow:
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        # MLflow's own HTTP retries (7, with backoff: ~4 min before an unreachable server's first error)
        # would hold the start and every later call; this tracker retries in the background instead.
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            import mlflow
        except ImportError as error:
            logger.warning("MLflow tracking is off (%r); metrics go to %s only", error, self.metrics_file)
            return
        self.mlflow, self.tracking_uri = mlflow, uri
        self._run = {"run_dir": run_dir, "experiment": experiment, "run_name": run_name,
                     "system_metrics_interval": system_metrics_interval, "resume_step": resume_step}
        # Opening the run is the first call in the queue: a store that cannot be reached at the start is
        # retried on the backoff's schedule like any later call, and gets everything once it answers.
        self._call("_open_run")

    def _open_run(self) -> None:
        mlflow, uri, run = self.mlflow, self.tracking_uri, self._run
        if self.run_id is not None and mlflow.active_run() is not None:  # opened, then a later call here failed
            return
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(run["experiment"]) is None:
            artifacts = (run["run_dir"] / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None
            mlflow.create_experiment(run["experiment"], artifact_location=artifacts)
        mlflow.set_experiment(run["experiment"])
        system = run["system_metrics_interval"] is not None and _can_sample_system()
        if system:
            mlflow.set_system_metrics_sampling_interval(run["system_metrics_interval"])
            mlflow.set_system_metrics_samples_before_logging(1)
        run_file = run["run_dir"] / "mlflow_run.json"
        resume_step = run["resume_step"]
        earlier = _earlier_run(run_file, uri) if resume_step is not None else None
        if earlier is not None:
            try:
                mlflow.get_run(earlier)
            except Exception as error:  # noqa: BLE001 - deleted, or another store under the same URI
                logger.warning("MLflow: the run directory's earlier run %s is not in the store (%r): a new run",
                               earlier, error)
                earlier = None
        if earlier is not None:
            self.run_id = mlflow.start_run(run_id=earlier, log_system_metrics=system).info.run_id
            self._logged_params = dict(mlflow.get_run(earlier).data.params)
            mlflow.set_tag("resumed_at_step", str(resume_step))
            logger.info("MLflow: continuing run %s from step %d", earlier, resume_step)
        else:
            self.run_id = mlflow.start_run(run_name=run["run_name"], log_system_metrics=system).info.run_id
            tmp = run_file.with_name(f".{run_file.name}.tmp")
            tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}) + "\n")
            tmp.replace(run_file)

    # -- the retry machinery ------------------------------------------------------------------------

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Call ``mlflow.<name>``; while the backend is down, queue it and retry when the backoff allows."""
        if self.mlflow is None:
            return
        self._queue(name, args, kwargs)
        if self._retry_at is None or self._clock() >= self._retry_at:
            self._flush()

    def _queue(self, name: str, args: tuple, kwargs: dict) -> None:
        if len(self._pending) >= self._max_pending:
            opening = self._pending[0][0] == "_open_run"  # kept: nothing else can be delivered without it
            del self._pending[1 if opening else 0]
            self.stats["dropped"] += 1
        self._pending.append((name, args, kwargs))

    def _flush(self) -> bool:
        was_down = self._retry_at is not None
        while self._pending:
            name, args, kwargs = self._pending[0]
            try:
                (getattr(self, name) if name == "_open_run" else getattr(self.mlflow, name))(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any backend failure: keep the call, retry later
                if getattr(error, "error_code", None) == "INVALID_PARAMETER_VALUE":  # refused, not failed: a retry
                    self._pending.popleft()  # would be refused again and hold back every call behind it
                    self.stats["dropped"] += 1
                    logger.warning("MLflow refused %s (%s); it is dropped (the metrics are in %s)", name, error,
                                   self.metrics_file)
                    continue
                self.stats["failures"] += 1
                if not was_down:
                    self.stats["outages"] += 1
                    self._down_since = self._clock()
                    what = (f"the store {self.tracking_uri} cannot be opened" if name == "_open_run"
                            else "tracking failed")
                    logger.warning("MLflow %s (%r); retrying in %.0f s, metrics are kept in %s meanwhile",
                                   what, error, self._backoff, self.metrics_file)
                self._retry_at = self._clock() + self._backoff
                self._backoff = min(self._backoff * 2, self._backoff_max)
                return False
            self._pending.popleft()
            if was_down:
                self.stats["delivered_late"] += 1
        if was_down:
            logger.warning("MLflow tracking is back after %.0f s; the queued calls were delivered",
                           self._clock() - (self._down_since or self._clock()))
        self._retry_at, self._down_since, self._backoff = None, None, self._backoff_first
        return True

    # -- what a run records -------------------------------------------------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        items = [(k, v[:6000]) for k, v in params.items() if self._logged_params.get(k) != v[:6000]]
        changed = [k for k, _ in items if k in self._logged_params]
        if changed:  # a resumed run may differ (world size, kernels): recorded as tags, MLflow keeps params fixed
            self.set_tags({f"resumed.{k}": v for k, v in items if k in changed})
            items = [(k, v) for k, v in items if k not in changed]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self._call("log_params", dict(items[start:start + 100]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_dataset(self, origin: str, context: str) -> None:
        """A dataset (its folder, or folder URL: a ``Shard.origin``) as an MLflow input (the digest of its
        manifest) and its manifest as an artifact."""
        if not self.enabled or self.mlflow is None:
            return
        from ..data import sources

        local = sources.local_path(origin)
        try:
            raw = ((local / "manifest.json").read_bytes() if local is not None
                   else sources.read_bytes(sources.manifest_location(origin)))
        except (OSError, ValueError) as error:  # read by the ranks a moment ago: say so, train on
            logger.warning("dataset %s: its manifest cannot be read for MLflow (%s)", origin, error)
            return
        name = json.loads(raw).get("name") or origin.rstrip("/").rpartition("/")[2]
        digest = hashlib.sha256(raw).hexdigest()[:16]
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder either way
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(str(local.resolve()) if local is not None else origin)
            dataset = MetaDataset(source=source, name=name, digest=digest)
        except Exception as error:  # noqa: BLE001 - no source type for this URL: the artifact still says it
            logger.warning("MLflow cannot describe dataset %s as an input (%r)", origin, error)
        else:
            self._call("log_input", dataset, context=context)
        # A copy in the run directory: the call may wait in the retry queue, and a URL has no local file.
        copy = self.metrics_file.parent / "datasets" / context / f"{name}-{digest}" / "manifest.json"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(raw)
        self._call("log_artifact", str(copy), f"data/{context}/{name}-{digest}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._call("log_metrics", metrics, step=step)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._call("log_artifacts" if path.is_dir() else "log_artifact", str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what waits (one last try, backoff or not) and close the run with ``status``."""
        if not self.enabled or self.mlflow is None:
            return
        self._retry_at = None
        self._queue("end_run", (), {"status": status})
        if not self._flush():
            logger.warning("MLflow tracking still failing at the end of the run: %d call(s) not delivered "
                           "(the metrics are in %s)", len(self._pending), self.metrics_file)
        if any(self.stats.values()):
            logger.warning("MLflow tracking: %s", self.stats)


def keep_steps_up_to(log: Path, step: int) -> None:
    """Drop the lines of a JSON-lines log after ``step``: a run resumed from there logs those steps again."""
    if not log.exists():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = log.with_name(f".{log.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(log)
        logger.info("%s: %d line(s) after step %d dropped (logged again as the run resumes)",
                    log.name, len(lines) - len(kept), step)


def _earlier_run(run_file: Path, uri: str) -> str | None:
    """The MLflow run this run directory logged to, when it was logged to the same store."""
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("tracking_uri") != uri:
        logger.warning("MLflow: the run directory's earlier run was in %s, this one goes to %s: a new run",
                       saved.get("tracking_uri"), uri)
        return None
    return saved.get("run_id")


def _can_sample_system() -> bool:
    try:
        import psutil  # noqa: F401 - MLflow's system-metrics monitor needs it
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# A pretraining run's record
# ---------------------------------------------------------------------------------------------


def track_run(config: ExperimentConfig, run_dir: Path, rank: int, world: int, device: torch.device, engine: Any,
                   model: torch.nn.Module, start: Start, train_shards: dict[str, list[Shard]],
                   val_shards: list[Shard]) -> Tracker:
    """MLflow (rank 0): the config's parameters, what ran it (tags), on what data (datasets, manifests)."""
    from ..model.kernels import active_kernels

    tracker = Tracker(run_dir, enabled=rank == 0, use_mlflow=config.tracking.mlflow,
                      experiment=config.tracking.experiment, tracking_uri=config.tracking.tracking_uri,
                      run_name=run_dir.name, system_metrics_interval=config.tracking.system_metrics_interval or None,
                      resume_step=start.step if start.data_state is not None else None)
    tracker.log_params(config.flat() | {"world_size": str(world), "zero_stage": str(engine.zero_optimization_stage()),
                                        "kernels": json.dumps(active_kernels(model))})
    if rank == 0:
        tracker.set_tags(run_tags(device, world))
        for context, shards in [*(("train", s) for s in train_shards.values()), ("validation", val_shards)]:
            for origin in dict.fromkeys(shard.origin for shard in shards):
                tracker.log_dataset(origin, context)
        tracker.log_artifacts(run_dir / "config.yaml", "config")
        tracker.log_artifacts(Path(config.deepspeed_config), "config")
    return tracker


class Progress:
    """Rank 0's progress: a bar on a terminal, else a log line per log step."""

    def __init__(self, rank: int, config: ExperimentConfig, first: int, last: int):
        self.rank, self.last, self.log_every = rank, last, config.tracking.log_every
        self.bar = None
        if rank == 0 and config.tracking.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=last, initial=first, desc="pretrain", dynamic_ncols=True)

    def report(self, done: int, metrics: dict[str, float], seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.1f}")
        elif self.rank == 0:
            eta = (self.last - done) * seconds / self.log_every
            logging.getLogger("uniter_ds.pretrain").info(
                "step %d/%d loss %.4f lr %.3g %.1f samples/s eta %.0fs", done, self.last, metrics["loss"],
                        metrics["lr"], metrics["samples_per_s"], eta)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_tags(device: torch.device, world: int) -> dict[str, Any]:
    """MLflow tags: the code, the packages and the machine the run ran on."""
    versions = package_versions()
    dirty = git_dirty()
    return {"git_commit": git_commit(), "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
            "device": device_name(device), "device_type": device.type, "world_size": world,
            **{f"version.{name}": version for name, version in versions.items()}}
