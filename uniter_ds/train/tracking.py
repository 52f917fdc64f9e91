"""Experiment tracking on rank 0: MLflow (embedded SQLite store in the run directory by default) and
a plain ``metrics.jsonl`` that is always written. A tracking backend that fails mid-run is reported
once and switched off; training goes on."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, use_mlflow: bool, experiment: str,
                 tracking_uri: str | None, run_name: str):
        self.enabled = enabled
        self.metrics_file = run_dir / "metrics.jsonl"
        self.mlflow = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        if not enabled or not use_mlflow:
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        try:
            import mlflow

            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                artifacts = (run_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None
                mlflow.create_experiment(experiment, artifact_location=artifacts)
            mlflow.set_experiment(experiment)
            self.run_id = mlflow.start_run(run_name=run_name).info.run_id
            self.mlflow, self.tracking_uri = mlflow, uri
        except Exception as error:  # noqa: BLE001 - any backend failure: warn and go on
            self._disable(error)

    def _disable(self, error: BaseException) -> None:
        warnings.warn(f"MLflow tracking failed and is off for the rest of the run: {error!r}", stacklevel=3)
        self.mlflow = None

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.mlflow is None:
            return
        try:
            getattr(self.mlflow, name)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            self._disable(error)

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled:
            return
        items = [(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self._call("log_params", dict(items[start:start + 100]))

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
        if self.enabled:
            self._call("end_run", status=status)
