"""Shards from anywhere: a loopback HTTP server, pipe: commands, brace ranges; named errors or counted skips."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniter_ds.data import DataError, ReaderStats, read_shard, resolve_sources
from uniter_ds.data import sources as remote
from uniter_ds.data.synth import synth_dataset

from .helpers import QuietHandler, serve_folder

CUT_AFTER = 0.5  # the cutting handler sends this share of a shard, then closes the connection


class _CuttingHandler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        if "/cut/" in self.path and self.path.endswith(".tar"):  # the whole length announced, half of it sent
            data = (Path(self.directory) / self.path.lstrip("/").replace("cut/", "", 1)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: int(len(data) * CUT_AFTER)])
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    synth_dataset(root / "ds", images=60, seed=0, img_dim=16, img_label_dim=9, min_regions=3, max_regions=6,
                  num_classes=8, max_shard_bytes=40_000)
    (root / "cut").mkdir()
    (root / "cut" / "ds").symlink_to(root / "ds")
    with serve_folder(root, _CuttingHandler) as base:
        yield root, base


def _images(shards, on_error="raise"):
    stats = ReaderStats()
    return [im for shard in shards for im in read_shard(shard, stats, on_error)], stats


def test_http_folder_shard_urls_and_brace_ranges_read_as_the_local_files(served):
    root, base = served
    local, _ = _images(resolve_sources([root / "ds"]))
    names = [s.name for s in resolve_sources([root / "ds"])]
    assert len(names) >= 3
    by_folder, _ = _images(resolve_sources([f"{base}/ds/"]))
    assert [im.key for im in by_folder] == [im.key for im in local]
    for a, b in zip(local, by_folder):
        assert np.array_equal(a.feat, b.feat) and np.array_equal(a.pos, b.pos) and a.captions == b.captions
    first, last = names[0].split("-")[1][:6], names[2].split("-")[1][:6]
    spec = f"{base}/ds/synth-{{{first}..{last}}}.tar"
    ranged = resolve_sources([spec])
    assert [s.name for s in ranged] == names[:3] and all(s.path.startswith("http://") for s in ranged)
    read, _ = _images(ranged)
    assert len(read) == sum(s.images for s in ranged)
    assert [s.name for s in resolve_sources([str(root / "ds" / f"synth-{{{first}..{last}}}.tar")])] == names[:3]


def test_pipe_commands_and_file_urls(served):
    root, _ = served
    name = resolve_sources([root / "ds"])[0].name
    local, _ = _images(resolve_sources([root / "ds" / name]))
    piped = resolve_sources([f"pipe:cat {root / 'ds' / name}"])
    assert piped[0].manifest.name == "synth" and piped[0].name == name
    assert [im.key for im in _images(piped)[0]] == [im.key for im in local]
    assert [im.key for im in _images(resolve_sources([f"file://{root / 'ds' / name}"]))[0]] == [im.key for im in local]


def test_a_missing_shard_is_a_named_404_or_a_counted_skip(served):
    root, base = served
    shards = resolve_sources([f"{base}/ds/"])
    gone = shards[1]
    moved = root / "ds" / (gone.name + ".away")
    (root / "ds" / gone.name).rename(moved)
    try:
        with pytest.raises(DataError, match=rf"{gone.name}: HTTP 404"):
            _images([gone])
        read, stats = _images(shards, on_error="skip")
        assert len(read) == sum(s.images for s in shards) - gone.images
        assert stats.corrupt_shards == 1 and stats.errors["shard_open"] == 1
    finally:
        moved.rename(root / "ds" / gone.name)
    with pytest.raises(DataError, match=r"HTTP 404"):
        resolve_sources([f"{base}/nowhere/"])


def test_a_connection_cut_mid_shard_is_named_or_counted(served):
    root, base = served
    shard = resolve_sources([f"{base}/cut/ds/"])[0]
    with pytest.raises(DataError, match=rf"cut/ds/{shard.name}: corrupt or truncated tar after \d+ of {shard.images}"):
        _images([shard])
    read, stats = _images([shard], on_error="skip")
    assert 0 < len(read) < shard.images and stats.errors["corrupt_shard"] == 1


def test_opening_retries_with_backoff_then_names_the_url(monkeypatch):
    calls = []

    def refuse(url, timeout_s):
        calls.append(url)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(remote, "_open_once", refuse)
    monkeypatch.setattr(remote.time, "sleep", lambda s: calls.append(s))
    with pytest.raises(DataError, match=r"http://x/a.tar: cannot open after 3 attempts \(refused\)"):
        remote.open_stream("http://x/a.tar", retries=2, backoff_s=0.5)
    assert calls == ["http://x/a.tar", 0.5, "http://x/a.tar", 1.0, "http://x/a.tar"]


def test_inspect_reads_a_dataset_by_url(served):
    _, base = served
    done = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "data", "inspect", f"{base}/ds/", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pairs"] == resolve_sources([f"{base}/ds/"])[0].manifest.pairs


def test_a_cache_directory_keeps_remote_shards_after_the_first_read(served, tmp_path, monkeypatch):
    root, base = served
    shards = resolve_sources([f"{base}/ds/"])[:2]
    first, _ = _images(shards)
    stats = ReaderStats()
    cached = [im for shard in shards for im in read_shard(shard, stats, cache_dir=tmp_path / "cache")]
    assert [im.key for im in cached] == [im.key for im in first]
    copies = sorted(p.name for p in (tmp_path / "cache").rglob("*.tar"))
    assert copies == sorted(s.name for s in shards) and not list((tmp_path / "cache").rglob("*.part"))
    away = root / "ds" / (shards[0].name + ".away")
    (root / "ds" / shards[0].name).rename(away)  # the server no longer has it: the cache answers
    try:
        monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
        again, _ = _images(shards)
        assert [im.key for im in again] == [im.key for im in first]
    finally:
        away.rename(root / "ds" / shards[0].name)


def test_fsspec_urls_read_through_fsspec_as_s3_and_gs_do(served):
    """s3:// and gs:// open through fsspec's filesystems (s3fs, gcsfs); its in-memory filesystem takes the
    same path here, without a network."""
    import fsspec  # a dependency of transformers' hub client
    root, _ = served
    memory = fsspec.filesystem("memory")
    for path in (root / "ds").iterdir():
        memory.pipe(f"/uniter-ds-test/ds/{path.name}", path.read_bytes())
    try:
        local, _ = _images(resolve_sources([root / "ds"]))
        by_folder = resolve_sources(["memory://uniter-ds-test/ds/"])
        assert [s.name for s in by_folder] == [s.name for s in resolve_sources([root / "ds"])]
        read, _ = _images(by_folder)
        assert [im.key for im in read] == [im.key for im in local]
        assert all(np.array_equal(a.feat, b.feat) for a, b in zip(local, read))
        with pytest.raises(DataError, match=r"memory://uniter-ds-test/nowhere/manifest.json"):
            resolve_sources(["memory://uniter-ds-test/nowhere/"])
    finally:
        memory.rm("/uniter-ds-test", recursive=True)


def test_a_remote_dataset_is_an_mlflow_input_with_its_manifest(served, tmp_path):
    import hashlib

    from mlflow.tracking import MlflowClient

    from uniter_ds.train.tracking import Tracker

    root, base = served
    tracker = Tracker(tmp_path, enabled=True, use_mlflow=True, experiment="remote-data", tracking_uri=None,
                      run_name="remote")
    synth_dataset(tmp_path / "val", images=4, seed=1, img_dim=16, img_label_dim=9, min_regions=3, max_regions=6,
                  num_classes=8)
    tracker.log_dataset(f"{base}/ds/", "train")
    tracker.log_dataset(str(tmp_path / "val"), "validation")
    tracker.finish()
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert f"{base}/ds/" in inputs["train"].source and str(tmp_path / "val") in inputs["validation"].source
    for context, folder in (("train", root / "ds"), ("validation", tmp_path / "val")):
        manifest = folder / "manifest.json"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        assert inputs[context].digest == digest
        logged = client.list_artifacts(run.info.run_id, f"data/{context}/synth-{digest}")
        assert [Path(a.path).name for a in logged] == ["manifest.json"]
        copy = tmp_path / "datasets" / context / f"synth-{digest}" / "manifest.json"
        assert copy.read_bytes() == manifest.read_bytes()


def test_a_stream_over_http_resumes_exactly(served, monkeypatch):
    """Restoring a worker re-reads the images it held from their shards' URLs, one pass per shard (a
    stream cannot seek), and continues with the uninterrupted stream's batches."""
    from uniter_ds.data import LoaderConfig, LoaderStats, StreamDataset

    monkeypatch.delenv(remote.CACHE_ENV, raising=False)
    root, base = served
    config = LoaderConfig(num_workers=0, split="resampled", token_budget=120, pool_budgets=2, min_pool_tokens=400,
                          shuffle_buffer=10, seed=2)
    stats, states, reference = LoaderStats(), [], []
    for batch in StreamDataset([f"{base}/ds/"], "mrc", config):
        stats.update(batch)
        states.append(stats.resume_state())
        reference.append((batch.meta["pairs"], batch.img_feat.tolist(), batch.img_masks.tolist()))
        if len(reference) == 40:
            break
    for taken in (3, 25):
        resumed = [(b.meta["pairs"], b.img_feat.tolist(), b.img_masks.tolist())
                   for b in itertools.islice(StreamDataset([f"{base}/ds/"], "mrc", config, resume=states[taken - 1]),
                                             40 - taken)]
        assert resumed == reference[taken:]
