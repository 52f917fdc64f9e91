"""Files from others are data: hostile checkpoints, manifests, shards and configs, through the real commands.

Each case is what an attacker or a careless data producer could hand a user. A payload that would run
code writes a marker file; the test asserts the marker does not exist and the command names the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniter_ds.data import DataError
from uniter_ds.data.format import Manifest
from uniter_ds.data.synth import synth_dataset

from .launcher import ROOT, cpu_env


def uniter_ds(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniter_ds.cli", *args], cwd=cwd, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "ds"
    synth_dataset(folder, images=12, seed=0, img_dim=16, img_label_dim=9, min_regions=3, max_regions=6,
                  num_classes=8, max_shard_bytes=20_000)
    return folder


def _with_manifest(dataset: Path, folder: Path, edit) -> Path:
    """A copy of ``dataset`` whose manifest ``edit`` changed (the shards renamed to match)."""
    folder.mkdir()
    manifest = json.loads((dataset / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (folder / shard["name"]).write_bytes((dataset / shard["name"]).read_bytes())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.tar; touch MARKER; cat x.tar", "$(touch MARKER).tar", "`touch MARKER`.tar",
                                  "../x.tar", "/etc/x.tar", "sub/x.tar", ".hidden.tar", "a b.tar", "x.tar\n",
                                  "x.tgz", 7])
def test_a_manifest_shard_name_that_is_not_a_plain_file_name_is_refused(dataset, tmp_path, name):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    with pytest.raises(DataError, match=r"manifest.json: malformed manifest: shards\[0\]\.name"):
        Manifest.from_text(json.dumps(manifest), str(tmp_path / "manifest.json"))


@pytest.mark.parametrize("key, value", [("images", -1), ("bytes", "12"), ("pairs", 1.5), ("images", True)])
def test_a_manifest_count_of_the_wrong_type_is_refused(dataset, tmp_path, key, value):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][1][key] = value
    with pytest.raises(DataError, match=rf"shards\[1\]\.{key}: {value!r}, expected an integer >= 0"):
        Manifest.from_text(json.dumps(manifest), "m.json")


def test_a_pipe_source_runs_no_command_a_manifest_names(dataset, tmp_path):
    """webdataset runs ``pipe:`` commands through a shell: a shard name from a served manifest would be
    pasted into it. Refused before any shard is opened, naming the manifest; the marker never appears."""
    marker = tmp_path / "MARKER"
    hostile = _with_manifest(dataset, tmp_path / "ds", lambda m: m["shards"][0].update(
        name=f"x.tar; touch {marker}; cat x.tar"))
    result = uniter_ds("data", "inspect", f"pipe:cat {hostile}/")
    assert result.returncode == 2
    no_traceback(result)
    assert f"pipe:cat {hostile}/manifest.json: malformed manifest: shards[0].name" in result.stderr
    assert not marker.exists()
    # The same folder with plain names reads through the same pipe: source.
    plain = uniter_ds("data", "inspect", f"pipe:cat {dataset}/", "--json")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads(plain.stdout)["images"] == 12
