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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, use_mlflow: bool, experiment: str,
                 tracking_uri: str | None, run_name: str, system_metrics_interval: float | None = None,
                 max_pending: int = 10_000, backoff: tuple[float, float] = (5.0, 300.0),
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.metrics_file = run_dir / "metrics.jsonl"
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
        if not enabled or not use_mlflow:
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        # MLflow's own HTTP retries (7, with backoff: ~4 min before an unreachable server's first error)
        # would hold the start and every later call; this tracker retries in the background instead.
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            import mlflow

            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                artifacts = (run_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None
                mlflow.create_experiment(experiment, artifact_location=artifacts)
            mlflow.set_experiment(experiment)
            system = system_metrics_interval is not None and _can_sample_system()
            if system:
                mlflow.set_system_metrics_sampling_interval(system_metrics_interval)
                mlflow.set_system_metrics_samples_before_logging(1)
            self.run_id = mlflow.start_run(run_name=run_name, log_system_metrics=system).info.run_id
            self.mlflow, self.tracking_uri = mlflow, uri
        except Exception as error:  # noqa: BLE001 - the store cannot be reached at all: no run to retry into
            logger.warning("MLflow tracking is off: the store %s cannot be opened (%r); metrics go to %s only",
                           uri, error, self.metrics_file)

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
            self._pending.popleft()
            self.stats["dropped"] += 1
        self._pending.append((name, args, kwargs))

    def _flush(self) -> bool:
        was_down = self._retry_at is not None
        while self._pending:
            name, args, kwargs = self._pending[0]
            try:
                getattr(self.mlflow, name)(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any backend failure: keep the call, retry later
                self.stats["failures"] += 1
                if not was_down:
                    self.stats["outages"] += 1
                    self._down_since = self._clock()
                    logger.warning("MLflow tracking failed (%r); retrying in %.0f s, metrics are kept in %s meanwhile",
                                   error, self._backoff, self.metrics_file)
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
        items = [(k, v[:6000]) for k, v in params.items()]
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


def _can_sample_system() -> bool:
    try:
        import psutil  # noqa: F401 - MLflow's system-metrics monitor needs it
    except ImportError:
        return False
    return True
