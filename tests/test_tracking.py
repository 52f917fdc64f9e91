"""MLflow tracking: the embedded store by default, and a failing backend never stops training."""

from __future__ import annotations

import json

import pytest

from uniter_ds.train.tracking import Tracker


def test_default_store_is_sqlite_in_the_run_directory(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="e", tracking_uri=None, run_name="r")
    tracker.log_params({"a.b": "1"})
    tracker.log_metrics({"loss": 2.0}, step=3)
    tracker.finish()
    assert tracker.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    run = mlflow.tracking.MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.params == {"a.b": "1"} and run.data.metrics == {"loss": 2.0}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 2.0}


def test_a_backend_that_fails_mid_run_is_switched_off_with_a_warning(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="e", tracking_uri=None, run_name="r")

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(mlflow, "log_metrics", broken)
    with pytest.warns(UserWarning, match="MLflow tracking failed.*tracking server went away"):
        tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=2)  # no second warning, no exception
    assert tracker.mlflow is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_an_unreachable_store_at_start_is_a_warning_too(tmp_path):
    with pytest.warns(UserWarning, match="MLflow tracking failed"):
        tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="e",
                          tracking_uri="sqlite:////nonexistent-dir/x/mlflow.db", run_name="r")
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert (tmp_path / "metrics.jsonl").exists()
