"""DeepSpeed pretraining: multi-rank equivalence, resume, scheduler, two simulated nodes, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from uniter_ds.data import synth_dataset
from uniter_ds.train.checkpointing import find_resume_point
from uniter_ds.train.config import ConfigError, load_config
from uniter_ds.train.scheduler import Stream, TaskScheduler

from .helpers import CountingHandler, serve_folder
from .launcher import ROOT, cpu_env, free_port, run_launcher

EQUIVALENCE = str(ROOT / "tests" / "dist" / "equivalence.py")


# ---------------------------------------------------------------------------------------------
# Config and scheduler (fast)
# ---------------------------------------------------------------------------------------------


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"data": {"train": [{"name": "d", "paths": ["x"], "tasks": {"mlm": 1}}]}}


def test_config_errors_name_the_key(tmp_path):
    path = _write(tmp_path / "c.yaml", BASE)
    assert load_config(path, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(path, ["data.train.0.tasks.itm=3"]).data.train[0].tasks == {"mlm": 1.0, "itm": 3.0}
    for override, message in [
        ("optim.lrr=3", "config key 'optim.lrr' is unknown"),
        ("optim.lr=abc", "config key 'optim.lr': expected float"),
        ("data.token_budget=-5", "config key 'data.token_budget': must be > 0"),
        ("data.masking=random", "config key 'data.masking': 'random' is not one of"),
        ("data.train.0.tasks.vqa=1", "config key 'data.train.0.tasks.vqa': unknown task"),
        ("model.init_from=gpt:/x", "config key 'model.init_from'"),
        ("optim.betas=[0.9]", "config key 'optim.betas'"),
        ("data.train.3.name=x", "--set data.train.3.name: data.train.3 is not an index"),
        ("data.batching=rows", "config key 'data.batching': 'rows' fills the packed layout's rows"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
            load_config(path, [override])
    with pytest.raises(ConfigError, match="config key 'data.train': at least one"):
        load_config(_write(tmp_path / "empty.yaml", {}))
    with pytest.raises(ConfigError, match="config key 'data.token_budget': 200 holds no row of data.pack_row_len"):
        load_config(path, ["data.batching=rows", "data.layout=packed", "data.token_budget=200"])
    rows = load_config(path, ["data.batching=rows", "data.layout=packed", "data.token_budget=1024"])
    assert (rows.data.batching, rows.data.pack_row_len) == ("rows", 256)


def test_recipes_load():
    for recipe in sorted((ROOT / "launch").glob("*.yaml")):
        config = load_config(recipe)
        assert config.data.train, recipe
    # The main job starts from its first stage's export, with the same model.
    init, demo = load_config(ROOT / "launch" / "demo-init.yaml"), load_config(ROOT / "launch" / "demo.yaml")
    assert demo.model.init_from == f"hf:{init.run_dir}/export/hf"
    assert (demo.model.preset, demo.model.overrides) == (init.model.preset, init.model.overrides)
    assert demo.data.train[0].tasks == {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2}
    base = load_config(ROOT / "launch" / "uniter-base.yaml")
    assert base.optim.lr == 5e-5 and base.optim.warmup_steps == 10000 and base.optim.grad_clip == 5.0
    assert base.optim.betas == [0.9, 0.98] and base.data.train[0].tasks == {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2}


def test_scheduler_frequencies_follow_the_mix_and_agree_everywhere():
    mix = {Stream("coco", "itm"): 3, Stream("coco", "mlm"): 4, Stream("coco", "mrfr"): 2, Stream("coco", "mrc-kl"): 2}
    scheduler = TaskScheduler(mix, seed=7)
    draws = [scheduler.draw(step) for step in range(20000)]
    counts = Counter(draws)
    for stream, weight in mix.items():
        assert abs(counts[stream] / len(draws) - weight / 11) < 0.01, stream
    # Another "rank" (a fresh object) draws the same sequence; another seed does not.
    assert [TaskScheduler(mix, seed=7).draw(step) for step in range(500)] == draws[:500]
    assert [TaskScheduler(mix, seed=8).draw(step) for step in range(500)] != draws[:500]
    per_micro = TaskScheduler(mix, seed=7, per_micro_batch=True)
    assert len(set(per_micro.for_step(3, 16))) > 1 and len(set(scheduler.for_step(3, 16))) == 1
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        scheduler.check_state(TaskScheduler(mix, seed=8).state_dict())


def test_resume_point_skips_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(10, True), (20, True), (30, False)]:
        (root / f"step{step:08d}").mkdir(parents=True)
        if complete:
            (root / f"step{step:08d}" / "complete.json").write_text("{}")
    (root / "latest").write_text("step00000030")  # the worst case: latest names the broken one
    assert find_resume_point(root).name == "step00000020"
    assert find_resume_point(root / "step00000010").name == "step00000010"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        find_resume_point(root / "step00000030")
    assert find_resume_point(tmp_path / "none") is None


# ---------------------------------------------------------------------------------------------
# Multi-rank equivalence (fixed batches, real launcher)
# ---------------------------------------------------------------------------------------------


def _equivalence_config(tmp_path: Path, stage: int) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    (tmp_path / f"ds{stage}.json").write_text(json.dumps(ds))
    return _write(tmp_path / f"eq{stage}.yaml", {
        "deepspeed_config": str(tmp_path / f"ds{stage}.json"), "seed": 3,
        "model": {"preset": "tiny", "overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        "data": {"train": [{"name": "eq", "paths": ["unused"], "tasks": {"mlm": 1}}]},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "total_steps": 50, "grad_clip": 1.0},
    })


def _max_weight_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)


def test_two_ranks_match_one_rank_on_the_same_global_batches(tmp_path):
    """Two ranks under ZeRO-2 and ZeRO-1 take the steps of one rank (ZeRO is nothing to partition there)."""
    outputs = {}
    for ranks, stage, extra in [(1, 2, ["--also-rank0-data-alone"]), (2, 2, []), (2, 1, [])]:
        out = tmp_path / f"{ranks}-{stage}.json"
        run_launcher(["--num_gpus", str(ranks), "--master_port", str(free_port()), EQUIVALENCE,
                      "--config", str(_equivalence_config(tmp_path, stage)), "--out", str(out), *extra])
        outputs[ranks, stage] = json.loads(out.read_text())
    one, alone = outputs[1, 2]["all"], outputs[1, 2]["rank0-alone"]
    for stage in (2, 1):
        two = outputs[2, stage]["all"]
        assert two["world"] == 2
        np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, err_msg=f"ZeRO-{stage}")
        assert _max_weight_diff(one["weights"], two["weights"]) < 1e-5, f"ZeRO-{stage}"
    # The comparison has power: without the gradient all-reduce a rank trains on its own half only,
    # and its weights land far outside the tolerance.
    assert _max_weight_diff(one["weights"], alone["weights"]) > 1e-3


SHARED_MEMORY_PROBE = """
import json, sys
from pathlib import Path
import torch, deepspeed.comm
from uniter_ds.train.distributed import init_distributed
rank, world, _ = init_distributed()
torch.distributed.barrier()  # every rank past its unlink
mapped = [line.split(maxsplit=5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()
          if "deepspeed_allreduce_buffer" in line]
total = torch.full((4,), float(rank + 1))
deepspeed.comm.inference_all_reduce(total)  # DeepSpeed's shared-memory all-reduce, after the unlink
Path(sys.argv[-1] + str(rank)).write_text(json.dumps({"mapped": sorted(set(mapped)), "total": total.tolist()}))
"""


def test_a_job_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce maps a 64 MiB /dev/shm file per rank and never unlinks it: the ranks unlink
    their own once all are mapped, so jobs do not fill RAM-backed /dev/shm, and the all-reduce still works."""
    port = free_port()
    (tmp_path / "probe.py").write_text(SHARED_MEMORY_PROBE)
    run_launcher(["--num_gpus", "2", "--master_port", str(port), str(tmp_path / "probe.py"), str(tmp_path / "rank")])
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}").read_text())
        assert seen["total"] == [3.0] * 4
        # Both ranks' files were mapped (DeepSpeed used them), and both were unlinked while mapped.
        assert [name.split("_")[-1].split()[0] for name in seen["mapped"]] == ["0", "1"], seen["mapped"]
        assert all(name.endswith("(deleted)") and f"_{port}_" in name for name in seen["mapped"]), seen["mapped"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


# ---------------------------------------------------------------------------------------------
# The pretraining entry point on real shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    common = dict(img_dim=64, img_label_dim=41, min_regions=5, max_regions=20, max_shard_bytes=60_000)
    synth_dataset(root / "train", images=240, seed=0, **common)
    synth_dataset(root / "val", images=40, seed=1, **common)
    return root


# The batcher's pool sized for a tiny dataset: the default (2^18 tokens, the reference's 8,192 pairs) costs
# each stream seconds of reading before its first batch.
SMALL_POOL = {"pool_budgets": 4, "min_pool_tokens": 2400}


def _run_config(tmp_path: Path, shards: Path, name: str, **overrides) -> Path:
    config = {
        "run_dir": str(tmp_path / name), "seed": 5, "deepspeed_config": str(ROOT / "ds_configs" / "cpu.json"),
        "model": {"preset": "tiny"},
        "data": {"train": [{"name": "synth", "paths": [str(shards / "train")],
                            "tasks": {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2}}],
                 "val": [], "token_budget": 600, "num_workers": 1, "split": "resampled", "shuffle_buffer": 50,
                 **SMALL_POOL},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "total_steps": 8},
        "eval": {"every": 0, "at_end": False},
        "checkpoint": {"every": 4, "keep_last": 2},
        "tracking": {"mlflow": False, "log_every": 1},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            config[section][field] = value
        else:
            config[key] = value
    return _write(tmp_path / f"{name}.yaml", config)


def _pretrain(config: Path, ranks: int = 2, extra: list[str] = ()) -> subprocess.CompletedProcess:
    return run_launcher(["--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
                         "uniter_ds.train.pretrain", "--config", str(config), *extra])


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(run_dir / "export" / "hf" / "model.safetensors")).items()}


def _compare_runs(a: Path, b: Path, steps: range) -> None:
    ma, mb = _metrics(a), _metrics(b)
    for step in steps:
        for key in [k for k in ma[step] if k.startswith("train/")]:
            np.testing.assert_allclose(mb[step][key], ma[step][key], rtol=1e-5, err_msg=f"step {step} {key}")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shards):
    tmp_path = tmp_path_factory.mktemp("straight")
    config = _run_config(tmp_path, shards, "straight")
    _pretrain(config)
    return tmp_path / "straight"


def test_scheduler_is_identical_across_ranks_and_data_is_split(straight_run):
    logs = [[json.loads(line) for line in (straight_run / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    assert [row["streams"] for row in logs[0]] == [row["streams"] for row in logs[1]]
    assert len(logs[0]) == 8 and len({row["streams"][0] for row in logs[0]}) > 1
    ids = [{tuple(p) for row in log for batch in row["pairs"] for p in batch} for log in logs]
    assert ids[0] and ids[1] and ids[0] != ids[1]


def test_resume_continues_exactly_and_ignores_an_interrupted_checkpoint(tmp_path, shards, straight_run):
    """Stopped after step 2 and resumed: the next steps draw streams the first two steps had read from
    (seed 5: itm at steps 1 and 3), which continue from their loader workers' saved places."""
    config = _run_config(tmp_path, shards, "resumed", **{"checkpoint.every": 2})
    _pretrain(config, extra=["--set", "stop_at_step=2"])
    root = tmp_path / "resumed" / "checkpoints"
    assert (root / "latest").read_text() == "step00000002"
    # A save killed half-way at step 4: the tag folder exists, has no completion marker, and in the
    # worst case even `latest` names it. Resume must take step 2.
    (root / "step00000004" / "global_step4").mkdir(parents=True)
    (root / "latest").write_text("step00000004")
    resumed = _pretrain(config, extra=["--resume"])
    _compare_runs(straight_run, tmp_path / "resumed", range(1, 9))
    assert "replaying" not in resumed.stdout + resumed.stderr  # every worker went on from its saved place
    log = (tmp_path / "resumed" / "rank0.jsonl").read_text().splitlines()
    streams = [json.loads(line)["streams"][0] for line in log]
    assert streams[2] in streams[:2]  # the run continued a stream it had begun before the checkpoint
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000006", "step00000008"]


def test_training_reads_shards_by_url_as_from_local_files(tmp_path, shards, straight_run):
    """The same job with its training shards served over HTTP (a dataset folder URL), started by
    `uniter-ds pretrain`, takes the same steps; the manifest is fetched once for the whole job (the
    launcher's check hands its resolution to the ranks, which hand it to every loader and the export)."""
    CountingHandler.requests.clear()
    with serve_folder(shards, CountingHandler) as base:
        train = [{"name": "synth", "paths": [f"{base}/train/"], "tasks": {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2}}]
        config = _run_config(tmp_path, shards, "by-url", **{"data.train": train})
        started = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(config)],
                                 cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-5000:]
    assert CountingHandler.requests["/train/manifest.json"] == 1, CountingHandler.requests
    assert sum(n for path, n in CountingHandler.requests.items() if path.endswith(".tar")) > 1  # shards: read
    _compare_runs(straight_run, tmp_path / "by-url", range(1, 9))
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer_info.json"):  # the export fetched them
        assert (tmp_path / "by-url" / "export" / "hf" / name).read_bytes() == \
            (straight_run / "export" / "hf" / name).read_bytes()


def test_two_simulated_nodes_agree_with_one_node(tmp_path, shards, straight_run):
    config = _run_config(tmp_path, shards, "nodes")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(config),
                               "--hostfile", str(hostfile), "--num-gpus", "1", "--no-ssh", "--node-rank", str(r),
                               "--master-addr", "127.0.0.1", "--master-port", port],
                              cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "nnodes=2" in outputs[0] and "node_rank=1" in outputs[1]
    _compare_runs(straight_run, tmp_path / "nodes", range(1, 9))


def test_cli_refuses_a_bad_key_before_spawning(tmp_path, shards):
    config = _run_config(tmp_path, shards, "bad")
    result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(config),
                             "--set", "optim.warmup=10"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "config key 'optim.warmup' is unknown" in result.stderr
    assert "deepspeed" not in result.stdout and not (tmp_path / "bad").exists()


def test_main_job_records_params_metrics_eval_and_export_in_mlflow(tmp_path, shards):
    import mlflow

    config = _run_config(tmp_path, shards, "tracked", tracking={"mlflow": True, "log_every": 2,
                                                                "experiment": "test-exp",
                                                                "system_metrics_interval": 1.0},
                         eval={"every": 4, "batches": 2, "retrieval_images": 8, "at_end": True})
    raw = yaml.safe_load(config.read_text())
    raw["data"]["val"] = [str(shards / "val")]
    config.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(config),
                             "--master-port", str(free_port())], cwd=ROOT, env=cpu_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run_dir = tmp_path / "tracked"
    summary = json.loads((run_dir / "result.json").read_text())
    assert f"exported weights: {run_dir / 'export'}" in result.stdout or "exported weights" in result.stdout
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["world_size"] == "2"
    assert run.data.params["data.train.0.tasks.itm"] == "3.0"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6, 8]
    assert "val/itm/acc" in run.data.metrics and "val/retrieval/text_to_image_r5" in run.data.metrics
    # Every accuracy and recall comes with its chance level on the same held-out items, printed beside it.
    held_out = summary["eval"]
    assert 0.5 <= held_out["val/itm/acc_chance"] < 1 and 0 < held_out["val/mlm/acc_chance"] < 1
    assert held_out["val/retrieval/r5_chance"] == 5 / 8 and held_out["val/retrieval/r1_chance"] == 1 / 8
    printed = next(line for line in result.stdout.splitlines() if line.startswith("held-out evaluation"))
    assert f"val/itm/acc={held_out['val/itm/acc']:.4f} ({held_out['val/itm/acc_chance']:.2f})" in printed
    assert f"val/retrieval/text_to_image_r1={held_out['val/retrieval/text_to_image_r1']:.4f} (0.12)" in printed
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/hf", "export/uniter"} <= artifacts
    # What ran it: code, packages, device.
    tags = run.data.tags
    assert tags["version.torch"] == torch.__version__ and tags["version.deepspeed"] != "unavailable"
    assert tags["device_type"] == "cpu" and tags["world_size"] == "2" and tags["git_dirty"] in ("true", "false")
    assert re.fullmatch(r"[0-9a-f]{7,}", tags["git_commit"])
    # On what data: each dataset an input with its manifest's digest, the manifests as artifacts.
    import hashlib

    inputs = {}
    for dataset_input in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]
        inputs[context] = dataset_input.dataset
    for context, folder in (("train", shards / "train"), ("validation", shards / "val")):
        manifest = (folder / "manifest.json").read_bytes()
        assert inputs[context].digest == hashlib.sha256(manifest).hexdigest()[:16]
        assert str(folder.resolve()) in inputs[context].source
        logged = [a.path for a in client.list_artifacts(run.info.run_id, f"data/{context}")]
        assert len(logged) == 1
        files = client.list_artifacts(run.info.run_id, logged[0])
        assert [Path(f.path).name for f in files] == ["manifest.json"]
    # How the machine was used: MLflow's system metrics (psutil is an MLflow dependency here).
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert summary["tracking"] == {"failures": 0, "outages": 0, "delivered_late": 0, "dropped": 0}
    assert (run_dir / "export" / "hf" / "model.safetensors").exists()


class _SavingEngine:
    """Writes what DeepSpeed's save_checkpoint would, enough for the marker and retention logic."""

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_retention_keeps_the_new_checkpoint_when_an_earlier_run_left_later_steps(tmp_path):
    from uniter_ds.train import checkpointing

    root, engine = tmp_path / "checkpoints", _SavingEngine()
    for step in (400, 800):  # an earlier, longer run in the same directory
        checkpointing.save(engine, root, step, {"step": step}, keep_last=3)
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step00000400", "step00000800"]

    new = checkpointing.save(engine, root, 500, {"step": 500}, keep_last=1)
    assert new.is_dir() and [p.name for p in checkpointing.complete_checkpoints(root)] == ["step00000500"]
    assert (root / "latest").read_text() == "step00000500"

    checkpointing.save(engine, root, 600, {"step": 600}, keep_last=2)
    checkpointing.save(engine, root, 700, {"step": 700}, keep_last=2)
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step00000600", "step00000700"]


def test_the_launcher_resolves_every_dataset_and_the_resume_path_before_starting_ranks(tmp_path, shards):
    def pretrain(config: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(config), "--dry-run",
                               *extra], capture_output=True, text=True, env=cpu_env(), timeout=120)

    tasks = {"itm": 1, "mlm": 1}
    with serve_folder(shards) as base:
        by_url = _run_config(tmp_path, shards, "url", **{"data.train": [
            {"name": "synth", "paths": [f"{base}/train/"], "tasks": tasks}], "data.val": [f"{base}/val/"]})
        done = pretrain(by_url)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "uniter_ds.train.pretrain" in done.stdout
        missing = _run_config(tmp_path, shards, "missing-val", **{"data.val": [f"{base}/nowhere/"]})
        done = pretrain(missing)
        assert done.returncode != 0 and "config key 'data.val'" in done.stderr and "HTTP 404" in done.stderr
    local_typo = _run_config(tmp_path, shards, "typo", **{"data.train": [
        {"name": "synth", "paths": [str(shards / "trian")], "tasks": tasks}]})
    done = pretrain(local_typo)
    assert done.returncode != 0 and "config key 'data.train.0.paths'" in done.stderr and "trian" in done.stderr
    done = pretrain(_run_config(tmp_path, shards, "resume"), "--resume", str(tmp_path / "no-such-checkpoint"))
    assert done.returncode != 0 and "no-such-checkpoint: does not exist" in done.stderr
