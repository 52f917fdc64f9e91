"""MLflow tracking: the embedded store by default, and a failing backend never stops training."""

from __future__ import annotations

import json

from uniter_ds.train.tracking import HTTP_DEFAULTS, Tracker


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


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_backend_that_fails_and_comes_back_gets_every_metric(tmp_path, monkeypatch, caplog):
    """An outage mid-run: training calls go on without an exception, the metrics wait, are retried on
    the backoff's schedule, and all reach the run, in order, once the backend is back; it is counted."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clock = Clock()
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="e", tracking_uri=None, run_name="r",
                      backoff=(5.0, 60.0), clock=clock)
    tracker.log_metrics({"loss": 1.0}, step=1)
    real, attempts = mlflow.log_metrics, []

    def down(*args, **kwargs):
        attempts.append(kwargs.get("step"))
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(mlflow, "log_metrics", down)
    for step in range(2, 8):  # one call a second: only the backoff's schedule reaches the backend
        clock.now += 1.0
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert attempts == [2, 2]  # at t=1, then not before t=6 (5 s), then not before t=16 (10 s)
    assert "MLflow tracking failed" in caplog.text and "retrying in 5 s" in caplog.text
    monkeypatch.setattr(mlflow, "log_metrics", real)
    clock.now = 20.0
    tracker.log_metrics({"loss": 0.1}, step=8)
    assert "MLflow tracking is back" in caplog.text
    tracker.finish()
    client = mlflow.tracking.MlflowClient(tracker.tracking_uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(1, 9))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert tracker.stats == {"failures": 2, "outages": 1, "delivered_late": 7, "dropped": 0}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def test_a_long_outage_drops_the_oldest_calls_counts_them_and_keeps_them_in_the_file(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clock = Clock()
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="e", tracking_uri=None, run_name="r",
                      max_pending=3, clock=clock)
    real = mlflow.log_metrics
    monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    for step in range(1, 7):
        tracker.log_metrics({"loss": float(step)}, step=step)
    monkeypatch.setattr(mlflow, "log_metrics", real)
    tracker.finish()  # the last try ignores the backoff
    client = mlflow.tracking.MlflowClient(tracker.tracking_uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [5, 6]
    assert tracker.stats["dropped"] == 4  # steps 1-4 (end_run took the third place in the queue)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_an_unreachable_store_at_start_is_a_warning_too(tmp_path, caplog, monkeypatch):
    import time

    from .launcher import free_port

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)  # the tracker's own defaults, as a job gets them
    start = time.monotonic()
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="e",
                      tracking_uri=f"http://127.0.0.1:{free_port()}", run_name="r")  # nothing listens there
    assert time.monotonic() - start < 20  # MLflow's defaults retried for ~4 minutes first
    assert "cannot be opened" in caplog.text and "retrying in 5 s" in caplog.text and tracker.run_id is None
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert (tmp_path / "metrics.jsonl").exists()


def test_a_store_unreachable_at_start_gets_the_run_and_every_call_once_it_answers(tmp_path, monkeypatch, caplog):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real, attempts = mlflow.set_experiment, []

    def down(*args, **kwargs):
        attempts.append(1)
        raise ConnectionError("no route to the tracking server")

    monkeypatch.setattr(mlflow, "set_experiment", down)
    clock = Clock()
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="late", tracking_uri=None, run_name="r",
                      backoff=(5.0, 60.0), clock=clock)
    assert tracker.run_id is None and attempts == [1]
    tracker.log_params({"seed": "1"})
    for step in (1, 2):
        clock.now += 1.0
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert attempts == [1]  # the backoff holds the next try until t=5
    monkeypatch.setattr(mlflow, "set_experiment", real)
    clock.now = 6.0
    tracker.log_metrics({"loss": 0.25}, step=3)
    assert tracker.run_id is not None and "MLflow tracking is back" in caplog.text
    tracker.finish()
    client = mlflow.tracking.MlflowClient(tracker.tracking_uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2, 3]
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"seed": "1"} and run.info.status == "FINISHED"
