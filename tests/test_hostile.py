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


# ---------------------------------------------------------------------------------------------
# Checkpoints: no file is unpickled without restriction (the payload tests are in test_export.py, the
# export and attention commands, and test_faults.py, --resume)
# ---------------------------------------------------------------------------------------------


UNSAFE_CALLS = ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load",
                "torch.serialization.add_safe_globals")


def _unsafe_loads(source: str) -> list[str]:
    """The calls in ``source`` that could run code from a file: torch.load without ``weights_only=True``,
    np.load with ``allow_pickle=True``, pickle and its kin, yaml's unsafe loaders, TorchScript, DeepSpeed's
    zero_to_fp32, and a DeepSpeed ``load_checkpoint`` in a function that does not route its reads through
    checkpoint_files.guard_deepspeed_loads first."""
    import ast

    def keyword(call: ast.Call, name: str):
        return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)),
                    None)

    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            if any(n.split(".")[0] in ("dill", "cloudpickle", "joblib", "marshal", "shelve") or "zero_to_fp32" in n
                   for n in names) or (isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle")
                                       and {a.name for a in node.names} - {"UnpicklingError", "PicklingError"}):
                found.append(f"line {node.lineno}: imports {', '.join(n for n in names if n)}")
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        if called == "torch.load" and keyword(node, "weights_only") is not True:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif called.endswith("np.load") or called == "numpy.load":
            if keyword(node, "allow_pickle") is not False and any(k.arg == "allow_pickle" for k in node.keywords):
                found.append(f"line {node.lineno}: np.load with allow_pickle")
        elif called in UNSAFE_CALLS or (called.split(".")[0] in ("pickle", "_pickle")
                                        and called.split(".")[-1] in ("load", "loads", "Unpickler")):
            found.append(f"line {node.lineno}: {called}")
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        calls = [ast.unparse(c.func) for c in ast.walk(function) if isinstance(c, ast.Call)]
        loads = [i for i, c in enumerate(calls) if c.endswith(".load_checkpoint")]
        guards = [i for i, c in enumerate(calls) if c.endswith("guard_deepspeed_loads")]
        if loads and not (guards and min(guards) < min(loads)):
            found.append(f"line {function.lineno}: {function.name} calls DeepSpeed's load_checkpoint unguarded")
    return found


def test_nothing_in_the_package_unpickles_a_file_without_restriction():
    found = {str(path.relative_to(ROOT)): bad for path in sorted((ROOT / "uniter_ds").rglob("*.py"))
             if (bad := _unsafe_loads(path.read_text()))}
    assert found == {}, found
    # The scan sees each kind of unsafe load (a scan that sees nothing passes everything).
    for unsafe in ("torch.load(f)", "torch.load(f, weights_only=False)", "np.load(f, allow_pickle=True)",
                   "pickle.loads(b)", "from pickle import load", "import dill",
                   "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint",
                   "yaml.load(f)", "torch.jit.load(f)", "def f(engine):\n    engine.load_checkpoint(d)",
                   "def f(engine):\n    engine.load_checkpoint(d)\n    guard_deepspeed_loads(engine)"):
        assert _unsafe_loads(unsafe), unsafe
    assert not _unsafe_loads("def f(engine):\n    guard_deepspeed_loads(engine)\n    engine.load_checkpoint(d)\n"
                             "    torch.load(f, weights_only=True)\n    np.load(f)\n    yaml.safe_load(f)")


def test_a_guarded_engine_reads_through_the_restricted_loader(tmp_path):
    """guard_deepspeed_loads hands DeepSpeed's checkpoint engine load_pt: plain tensors and DeepSpeed's own
    value types load, a payload is refused naming the file."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from uniter_ds.checkpoint_files import CheckpointFileError, guard_deepspeed_loads

    from .helpers import _OpensAFile

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    guard_deepspeed_loads(engine)
    plain = {"w": torch.ones(3), "loss_scaler": DynamicLossScaler(8, 1000, 1, False, True),
             "zero_stage": ZeroStageEnum(2), "shapes": {"w": torch.Size([3])}, "names": {"a", "b"}}
    torch.save(plain, tmp_path / "plain.pt")
    loaded = engine.checkpoint_engine.load(str(tmp_path / "plain.pt"), map_location="cpu")
    assert torch.equal(loaded["w"], plain["w"]) and loaded["loss_scaler"].cur_scale == 8
    assert loaded["zero_stage"] == ZeroStageEnum(2) and loaded["names"] == {"a", "b"}
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.ones(3), "payload": _OpensAFile(marker)}, tmp_path / "payload.pt")
    with pytest.raises(CheckpointFileError, match=r"payload.pt: refused: it names io.open"):
        engine.checkpoint_engine.load(str(tmp_path / "payload.pt"), map_location="cpu")
    assert not marker.exists()


def test_an_original_checkpoint_that_would_run_code_is_refused_by_import_and_init_from(tmp_path, tiny_config):
    """``uniter-ds import-uniter FILE`` and ``model.init_from: uniter:FILE`` on a .pt from someone else whose
    pickle calls a function: refused naming the file and the function; the marker never appears."""
    import torch

    from uniter_ds.checkpoint_files import CheckpointFileError
    from uniter_ds.model import UniterForPretraining, to_original_state_dict
    from uniter_ds.train.config import load_config
    from uniter_ds.train.engine import build_model

    from .helpers import _OpensAFile

    marker = tmp_path / "MARKER"
    state = to_original_state_dict(UniterForPretraining(tiny_config))
    torch.save(state | {"payload": _OpensAFile(marker)}, tmp_path / "uniter.pt")
    (tmp_path / "uniter.json").write_text(tiny_config.to_json_string())
    result = uniter_ds("import-uniter", str(tmp_path / "uniter.pt"), "--config", str(tmp_path / "uniter.json"),
                       "--out", str(tmp_path / "imported"))
    assert result.returncode == 2, result.stderr[-3000:]
    no_traceback(result)
    assert f"{tmp_path / 'uniter.pt'}: refused: it names io.open" in result.stderr
    assert not (tmp_path / "imported").exists()
    data = f"data.train=[{{name: s, paths: [{tmp_path}], tasks: {{mlm: 1}}}}]"  # not read by build_model
    config = load_config(None, [data, "model.preset=tiny", f"model.init_from=uniter:{tmp_path / 'uniter.pt'}"])
    with pytest.raises(CheckpointFileError, match=r"uniter.pt: refused: it names io.open"):
        build_model(config)
    assert not marker.exists()
    torch.save(state, tmp_path / "plain.pt")  # the same weights without the payload load
    config = load_config(None, [data, "model.preset=tiny", f"model.init_from=uniter:{tmp_path / 'plain.pt'}"])
    pooler = "uniter.pooler.dense.weight"
    assert torch.equal(to_original_state_dict(build_model(config))[pooler], state[pooler])
