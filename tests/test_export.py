"""Export (any ZeRO stage -> hf / original layout, verified) and import of original checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from uniter_ds.data import synth_dataset
from uniter_ds.export import ExportError, export, import_uniter, probe_batch
from uniter_ds.model import UniterConfig, UniterForPretraining, UniterModel, to_original_state_dict

from .launcher import ROOT, free_port, run_launcher

REFERENCE = Path(__file__).with_name("data") / "uniter-base-state-dict.txt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """2-rank CPU pretraining runs with ZeRO-2 and ZeRO-3 checkpoints."""
    root = tmp_path_factory.mktemp("export")
    synth_dataset(root / "data", images=60, img_dim=64, img_label_dim=41, min_regions=5, max_regions=15,
                  max_shard_bytes=40_000)
    runs = {}
    for stage in (2, 3):
        ds = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
        ds["zero_optimization"]["stage"] = stage
        (root / f"ds{stage}.json").write_text(json.dumps(ds))
        config = {
            "run_dir": str(root / f"zero{stage}"), "seed": 1, "deepspeed_config": str(root / f"ds{stage}.json"),
            "model": {"preset": "tiny"},
            "data": {"train": [{"name": "s", "paths": [str(root / "data")],
                                "tasks": {"mlm": 1, "itm": 1, "mrc-kl": 1}}],
                     "token_budget": 500, "num_workers": 0, "split": "resampled",
                     "pool_budgets": 4, "min_pool_tokens": 2000},
            "optim": {"lr": 1e-3, "warmup_steps": 1, "total_steps": 4},
            "eval": {"every": 0, "at_end": False}, "checkpoint": {"every": 0, "keep_last": 1},
            "tracking": {"mlflow": False, "log_every": 2}, "export_at_end": False,
        }
        (root / f"zero{stage}.yaml").write_text(yaml.safe_dump(config))
        run_launcher(["--num_gpus", "2", "--master_port", str(free_port()), "--module", "uniter_ds.train.pretrain",
                      "--config", str(root / f"zero{stage}.yaml")])
        runs[stage] = root / f"zero{stage}"
    return runs


def _consolidated(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoints_export_exactly_and_reload(checkpoints, stage, tmp_path):
    run_dir = checkpoints[stage]
    result = export(run_dir, tmp_path / "out", heads=True)
    assert result["step"] == 4 and set(result["written"]) == {"hf", "uniter"}
    fp32 = _consolidated(run_dir)
    assert all(torch.isfinite(v).all() for v in fp32.values())
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "out" / "hf" / "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.equal(tensor, fp32[name]), name
    training_model = UniterForPretraining(UniterConfig.from_preset("tiny"))
    training_model.load_state_dict(fp32, strict=False)
    training_model.eval()
    batch = probe_batch(training_model.config, seed=5)
    reloaded = UniterForPretraining.from_pretrained(tmp_path / "out" / "hf").eval()
    with torch.no_grad():
        for task_free in (training_model.uniter(batch), reloaded.uniter(batch)):
            assert torch.isfinite(task_free.sequence_output).all()
        torch.testing.assert_close(reloaded.uniter(batch).sequence_output,
                                   training_model.uniter(batch).sequence_output, atol=1e-5, rtol=0)
    original = torch.load(tmp_path / "out" / "uniter" / "uniter.pt", weights_only=True)
    word = "uniter.embeddings.word_embeddings.weight"
    assert torch.equal(original[word], fp32[word])
    assert torch.equal(original["cls.predictions.decoder.weight"], original[word])
    card = (tmp_path / "out" / "hf" / "README.md").read_text()
    assert "training step: 4" in card and "mrc-kl" in card
    tokenizer = json.loads((tmp_path / "out" / "hf" / "tokenizer_info.json").read_text())
    assert tokenizer["name"].startswith("uniter-ds-synth")


def test_encoder_export_in_bf16_and_sharded(checkpoints, tmp_path):
    export(checkpoints[2], tmp_path / "bf16", fmt="hf", dtype="bf16")
    encoder = UniterModel.from_pretrained(tmp_path / "bf16" / "hf")
    assert encoder.pooler.weight.dtype == torch.bfloat16
    assert not (tmp_path / "bf16" / "uniter").exists()
    export(checkpoints[2], tmp_path / "sharded", fmt="hf", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single = UniterModel.from_pretrained(tmp_path / "bf16" / "hf").float()
    sharded = UniterModel.from_pretrained(tmp_path / "sharded" / "hf")
    batch = probe_batch(sharded.config)
    with torch.no_grad():
        torch.testing.assert_close(single(batch).pooled_output, sharded(batch).pooled_output, atol=5e-2, rtol=0)


def test_corrupt_or_incomplete_checkpoint_fails_cleanly(checkpoints, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[2], broken)
    tag = next((broken / "checkpoints").glob("step*"))
    shard = next(tag.glob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ExportError, match=rf"{tag.name}: {shard} is 1000 bytes, \d+ when it was saved"):
        export(broken, tmp_path / "out")  # complete.json's file sizes name the damage
    marker = json.loads((tag / "complete.json").read_text())
    (tag / "complete.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
    with pytest.raises(ExportError, match=rf"{shard}: cannot be read"):  # unverifiable: still named
        export(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    (tag / "complete.json").unlink()
    with pytest.raises(ExportError, match=r"no complete, undamaged checkpoint .*: step0+4: incomplete"):
        export(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("file", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused_by_export_and_attention(checkpoints, stage, file,
                                                                                   tmp_path):
    """The real commands on a checkpoint from someone else: a pickled payload in its model states or in a
    ZeRO optimizer shard (sizes in complete.json forged to match) runs nothing; the file is named."""
    import shutil
    import subprocess
    import sys

    from .helpers import poison_checkpoint_file
    from .launcher import cpu_env

    run = tmp_path / "run"
    shutil.copytree(checkpoints[stage], run)
    tag = next((run / "checkpoints").glob("step*"))
    poisoned = sorted(tag.glob(f"*{file}"))[0]  # ZeRO-3: zero_pp_rank_0_mp_rank_00_model_states.pt, read first
    marker = tmp_path / "MARKER"
    poison_checkpoint_file(poisoned, marker)
    data = checkpoints[stage].parent / "data"
    for command in (["export", str(run), "--out", str(tmp_path / "out")],
                    ["attention", str(tag), "--data", str(data), "--out", str(tmp_path / "maps")]):
        result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", *command], cwd=ROOT, env=cpu_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"{poisoned}: refused: it names io.open" in result.stderr, result.stderr[-3000:]
        assert not marker.exists(), command
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_export_and_import_refuse_an_out_that_would_delete_what_they_read(checkpoints, tmp_path, tiny_config):
    """``--out`` that is, contains or lies inside the source is refused even with ``--overwrite`` (it used to
    delete the run); an ``OUT.tmp`` someone else made is not deleted; an ``--out`` that is a file is named."""
    import shutil
    import subprocess
    import sys

    from uniter_ds.export import PARTIAL_MARKER

    from .launcher import cpu_env

    run = tmp_path / "run"
    shutil.copytree(checkpoints[2], run)
    tag = next((run / "checkpoints").glob("step*"))
    files = {p: p.stat().st_size for p in run.rglob("*") if p.is_file()}
    for out, relation in ((run, "contains"), (run / "checkpoints", "contains"), (tag, "is"),
                          (tag / "export", "lies inside")):
        with pytest.raises(ExportError, match=rf"--out {out}: {out} {relation} the source {tag}"):
            export(run, out, overwrite=True)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(to_original_state_dict(UniterForPretraining(tiny_config)), weights / "uniter.pt")
    (weights / "uniter.json").write_text(tiny_config.to_json_string())
    with pytest.raises(ExportError, match="contains the source"):
        import_uniter(weights / "uniter.pt", weights / "uniter.json", weights, overwrite=True)
    with pytest.raises(ExportError, match="contains the source"):
        export(weights / "uniter.pt", weights, config_file=weights / "uniter.json", overwrite=True)
    assert {p: p.stat().st_size for p in run.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in weights.iterdir()) == ["uniter.json", "uniter.pt"]
    # Someone's OUT.tmp stays; one an interrupted export left (marked) is replaced.
    (tmp_path / "out.tmp").mkdir()
    (tmp_path / "out.tmp" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out.tmp exists and is not a folder an interrupted export left"):
        export(run, tmp_path / "out")
    assert (tmp_path / "out.tmp" / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    (tmp_path / "out.tmp" / PARTIAL_MARKER).write_text("")
    export(run, tmp_path / "out", fmt="hf")
    assert not (tmp_path / "out.tmp").exists() and not (tmp_path / "out" / PARTIAL_MARKER).exists()
    # An --out that is a file, through the command: named, no traceback, the file intact.
    (tmp_path / "a-file").write_text("x")
    for command in (["export", str(run), "--out", str(tmp_path / "a-file"), "--overwrite"],
                    ["import-uniter", str(weights / "uniter.pt"), "--config", str(weights / "uniter.json"),
                     "--out", str(tmp_path / "a-file")]):
        result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", *command], cwd=ROOT, env=cpu_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"--out {tmp_path / 'a-file'}: is a file" in result.stderr
    assert (tmp_path / "a-file").read_text() == "x"


def _reference_shapes() -> dict[str, tuple[int, ...]]:
    lines = [line.split() for line in REFERENCE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {name: tuple(int(x) for x in shape.split("x")) for name, shape in lines}


def test_base_state_dict_exports_to_the_reference_layout_and_imports_back(tmp_path):
    torch.manual_seed(0)
    config = UniterConfig.from_preset("base")
    model = UniterForPretraining(config).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    config.to_json_file(tmp_path / "config.json")
    export(tmp_path / "weights.pt", tmp_path / "out", fmt="uniter", heads=True, config_file=tmp_path / "config.json")
    original = torch.load(tmp_path / "out" / "uniter" / "uniter-base.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in original.items()} == _reference_shapes()
    original_config = json.loads((tmp_path / "out" / "uniter" / "uniter-base.json").read_text())
    # the image dims travel too: the original code and import-uniter read them from this file
    assert original_config["hidden_size"] == 768 and original_config["img_dim"] == 2048
    assert original_config["img_label_dim"] == 1601 and original_config["layer_norm_eps"] == 1e-12
    folder = tmp_path / "out" / "uniter"
    result = import_uniter(folder / "uniter-base.pt", folder / "uniter-base.json", tmp_path / "imported")
    assert result["missing"] == [] and result["unexpected"] == []
    imported = UniterForPretraining.from_pretrained(tmp_path / "imported").eval()
    batch = probe_batch(config)
    with torch.no_grad():
        assert torch.equal(imported.uniter(batch).sequence_output, model.uniter(batch).sequence_output)


def test_import_reports_missing_and_unexpected_keys(tmp_path, tiny_config):
    model = UniterForPretraining(tiny_config)
    state = {"module." + k: v for k, v in to_original_state_dict(model).items() if not k.startswith("itm_output")}
    state["module.some_vqa_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "ft.pt")
    tiny_config.to_json_file(tmp_path / "c.json")
    result = import_uniter(tmp_path / "ft.pt", tmp_path / "c.json", tmp_path / "out")
    assert result["missing"] == ["itm_head.bias", "itm_head.weight"]
    assert result["unexpected"] == ["module.some_vqa_head.weight"]
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["missing"] == result["missing"]


def test_readme_fine_tuning_snippet_runs(checkpoints, tmp_path):
    export(checkpoints[2], tmp_path / "export", fmt="hf")
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- fine-tuning snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(snippet.replace("runs/demo/export/hf", str(tmp_path / "export" / "hf")), namespace)  # noqa: S102
    assert namespace["logits"].shape == (2, 3)
    assert namespace["loss"].requires_grad


# Run where uniter_ds cannot be imported: transformers alone must load the export (remote code).
TRANSFORMERS_ALONE = r"""
import importlib.abc, sys
class NoUniterDs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "uniter_ds" or name.startswith("uniter_ds."):
            raise ImportError("uniter_ds is not installed here")
sys.meta_path.insert(0, NoUniterDs())
import torch
from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer
folder, inputs_file, out_file = sys.argv[1:4]
inputs = torch.load(inputs_file)
encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
full = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    out, full_out = encoder(**inputs), full.uniter(**inputs)
try:
    import uniter_ds  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
torch.save({"hidden": out.last_hidden_state, "pooled": out.pooler_output, "full": full_out.last_hidden_state,
            "module": type(encoder).__module__, "blocked": blocked,
            "ids": tokenizer("A dog next to a cat")["input_ids"]}, out_file)
"""


def test_export_loads_with_transformers_alone(checkpoints, tmp_path):
    """AutoModel / AutoModelForPreTraining / AutoTokenizer from the export folder in a process where
    uniter_ds cannot be imported: the same outputs, the training data's tokenizer."""
    import os
    import subprocess
    import sys

    from .test_hf import padded_inputs

    export(checkpoints[2], tmp_path / "out", heads=True)
    hf = tmp_path / "out" / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "uniter" and config["auto_map"]["AutoModel"] == "modeling.UniterModel"
    assert {"modeling.py", "config.py", "inputs.py", "kernels.py", "ot.py", "tokenizer.json"} <= \
        {p.name for p in hf.iterdir()}
    inputs = padded_inputs(UniterConfig.from_preset("tiny"), seed=7)
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "alone.py").write_text(TRANSFORMERS_ALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "alone.py"), str(hf), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "alone.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = torch.load(tmp_path / "alone.pt")
    assert alone["blocked"] and alone["module"].startswith("transformers_modules")
    ours = UniterModel.from_pretrained(hf).eval()
    with torch.no_grad():
        expected = ours(**inputs)
    torch.testing.assert_close(alone["hidden"], expected.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone["pooled"], expected.pooler_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone["full"], expected.last_hidden_state, atol=1e-6, rtol=0)
    # The synthetic corpus is lower-cased whole words: the exported tokenizer gives the vocabulary's ids.
    vocab = (checkpoints[2].parent / "data" / "vocab.txt").read_text().splitlines()
    words = ["[CLS]", "a", "dog", "next", "to", "a", "cat", "[SEP]"]
    assert alone["ids"] == [vocab.index(w) for w in words]
    card = (hf / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "uniter" in meta["tags"] and meta["datasets"]


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_import_uniter_reads_our_own_original_layout_export(preset, tmp_path):
    """export --format uniter, then import-uniter of what it wrote: every weight back, nothing missing.
    Each preset's layers, heads, vocabulary and feature sizes; base and large at a narrow hidden width (the
    names and the fused q/k/v split do not depend on it, and the full widths cost a minute of CPU here)."""
    torch.manual_seed(0)
    narrow = {} if preset == "tiny" else {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    config = UniterConfig.from_preset(preset, **narrow)
    model = UniterForPretraining(config)
    dtype = "bf16" if preset == "large" else "fp32"
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    config.to_json_file(tmp_path / "config.json")
    result = export(tmp_path / "weights.pt", tmp_path / "out", fmt="uniter", heads=True, dtype=dtype,
                    config_file=tmp_path / "config.json")
    assert not any("itm_output" in w for w in result["warnings"])
    del model
    written = Path(result["written"]["uniter"])
    imported = import_uniter(written, written.with_suffix(".json"), tmp_path / "imported")
    assert imported["missing"] == [] and imported["unexpected"] == []
    back = UniterForPretraining.from_pretrained(tmp_path / "imported")
    original = torch.load(tmp_path / "weights.pt", weights_only=True)
    for name, tensor in back.state_dict().items():
        want = original[name].to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        assert torch.equal(tensor.to(want.dtype), want), name


def test_encoder_only_original_export_warns_about_the_retrieval_head(tiny_config, tmp_path):
    torch.save(UniterForPretraining(tiny_config).state_dict(), tmp_path / "weights.pt")
    tiny_config.to_json_file(tmp_path / "config.json")
    result = export(tmp_path / "weights.pt", tmp_path / "out", fmt="uniter", config_file=tmp_path / "config.json")
    assert any("itm_output" in w and "--heads" in w for w in result["warnings"])


def test_export_training_and_analysis_do_not_reach_into_each_other():
    """Checkpoint discovery lives in uniter_ds/run_layout.py and plotting in uniter_ds/plotting.py, so export
    imports nothing from train/ and analysis/ nothing from bench/ (an import cycle once, a private helper)."""
    import ast

    package = ROOT / "uniter_ds"

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        return names

    assert not {m for m in imported(package / "export.py") if m.startswith(".train")}
    for module in (package / "analysis").glob("*.py"):
        assert not {m for m in imported(module) if m.startswith("..bench")}, module


def test_readme_transformers_snippet_runs(checkpoints, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- transformers snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    export(checkpoints[2], tmp_path / "export")
    namespace: dict = {}
    exec(snippet.replace("runs/demo/export/hf", str(tmp_path / "export" / "hf")), namespace)  # noqa: S102
    assert namespace["out"].logits.shape == (2, 3) and torch.isfinite(namespace["out"].loss)
    assert namespace["model"].classifier.weight.grad is not None
