"""Faults injected into real 2-rank jobs (the deepspeed launcher, CPU ranks): what a long pretraining run
meets, and what it must do about it (issue 14). Data faults: a truncated shard, a shard whose tar header
is damaged mid-file, an image whose features hold NaN; a model whose loss turns NaN."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from uniter_ds.data import Manifest, synth_dataset

from .launcher import ROOT, cpu_env, deepspeed_bin, free_port


def _launch(config: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "uniter_ds.train.pretrain", "--config", str(path)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)


def _config(run_dir: Path, data: Path, **data_options) -> dict:
    return {
        "run_dir": str(run_dir), "seed": 3, "deepspeed_config": str(ROOT / "ds_configs" / "cpu.json"),
        "model": {"preset": "tiny"},
        "data": {"train": [{"name": "synth", "paths": [str(data)], "tasks": {"mlm": 1}}], "val": [],
                 "token_budget": 600, "num_workers": 1, "split": "exact", "shuffle_buffer": 20,
                 "pool_budgets": 4, "min_pool_tokens": 2400, **data_options},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "total_steps": 12},
        "eval": {"every": 0, "at_end": False}, "checkpoint": {"every": 0, "at_end": False, "keep_last": 1},
        "export_at_end": False, "tracking": {"mlflow": False, "log_every": 4},
    }


def _small_data(folder: Path, images: int, seed: int = 2) -> Path:
    synth_dataset(folder, images=images, seed=seed, img_dim=64, img_label_dim=41, min_regions=5, max_regions=20,
                  max_shard_bytes=60_000)
    return folder


def _wait_until(done, process: subprocess.Popen, what: str, timeout: float = 180, every: float = 0.5) -> None:
    """Poll ``done()`` while ``process`` runs; fail naming ``what`` if it ends or time runs out first."""
    import time

    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None and time.monotonic() < deadline, what
        time.sleep(every)


def _metric_rows(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _nan_into_features(shard: Path) -> str:
    """Overwrite the first feature of the shard's second image with an fp16 NaN, in place (same size)."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".feat.npy")][1]
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + 8)
        header_len = int.from_bytes(f.read(2), "little")  # .npy v1: magic (6) + version (2) + length (2)
        f.seek(member.offset_data + 10 + header_len)
        f.write(b"\x00\x7e")  # 0x7E00, little-endian: NaN
    return member.name.split(".")[0]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faults")
    _small_data(root / "data", 240, seed=0)
    shards = Manifest.load(root / "data").shards
    assert len(shards) >= 6
    truncated, header, nan = (root / "data" / s.name for s in shards[1:4])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    with open(header, "r+b") as f:  # a 512-byte tar header in the middle, overwritten
        f.seek((header.stat().st_size // 2) // 512 * 512)
        f.write(b"\xff" * 512)
    key = _nan_into_features(nan)
    return root, {"truncated": truncated.name, "truncated_images": shards[1].images, "header": header.name,
                  "nan": nan.name, "nan_key": key}


def _last_metrics(run_dir: Path) -> dict:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]


def test_data_faults_are_skipped_counted_and_reported(damaged):
    root, faults = damaged
    done = _launch(_config(root / "skip", root / "data", on_error="skip", max_skip_fraction=0.9), root / "skip.yaml")
    assert done.returncode == 0, done.stderr[-4000:]
    final = _last_metrics(root / "skip")
    # Every fault counted by kind, over both ranks, in metrics.jsonl (and MLflow: the same call logs both).
    assert final["data/errors/shard_size"] >= 1 and final["data/errors/corrupt_shard"] >= 1
    assert final["data/errors/nonfinite"] >= 1 and final["data/skipped_images"] >= 1
    assert final["data/corrupt_shards"] >= 2 and final["data/lost_images"] > faults["truncated_images"]
    assert 0 < final["data/skip_fraction"] < 0.9
    # No NaN reached the model: every step's loss is finite, and none was counted non-finite.
    rows = [json.loads(line) for line in (root / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["loss"] == row["loss"] for row in rows) and not any(row["train/nonfinite_losses"] for row in rows)
    # Each fault named in the log (the rank that met it), and the run's summary at the end.
    log = done.stdout + done.stderr
    assert faults["truncated"] in log and faults["header"] in log and faults["nan_key"] in log
    assert "hold NaN or inf" in log
    summary = json.loads((root / "skip" / "result.json").read_text())["data"]
    assert summary["corrupt_shards"] == final["data/corrupt_shards"]
    assert f"data: {summary['images']:.0f} images read; {summary['skipped_images']:.0f} skipped" in done.stdout


def test_too_much_data_lost_stops_the_run_with_the_counts_and_no_traceback(damaged):
    root, faults = damaged
    done = _launch(_config(root / "strict", root / "data", on_error="skip", max_skip_fraction=0.01),
                   root / "strict.yaml")
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "over data.max_skip_fraction (1.0%)" in log and "no checkpoint was saved yet" in log
    assert "Traceback" not in log
    shutil.rmtree(root / "strict")


def test_on_error_raise_names_the_shard(damaged):
    root, faults = damaged
    done = _launch(_config(root / "raise", root / "data"), root / "raise.yaml")
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert any(faults[k] in log for k in ("truncated", "header", "nan")) and "DataError" in log


def test_a_nonfinite_loss_stops_the_run_naming_the_steps(tmp_path):
    clean = tmp_path / "clean"
    _small_data(clean, 60)
    config = _config(tmp_path / "diverges", clean)
    config["optim"] |= {"lr": 1e12, "warmup_steps": 0}  # diverges within a few steps
    config["optim"]["grad_clip"] = 0.0
    done = _launch(config, tmp_path / "diverges.yaml")
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "non-finite loss in" in log and "in steps " in log and "Traceback" not in log
    rows = [json.loads(line) for line in (tmp_path / "diverges" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/nonfinite_losses"] > 0 and rows[-1]["step"] < 12  # stopped at the first log step after


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _argv(pid: int) -> list[bytes]:
    """A process's arguments; empty for one that is gone, a zombie, or still between fork and exec."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _rank_pid(runner: int, rank: int) -> int | None:
    """The rank's own process: ``python -u -m uniter_ds.train.pretrain ...`` with ``RANK=rank``. Its loader fork
    server has the same environment and names the module too (it preloads it), so the match is on argv."""
    for pid in _descendants(runner):
        argv = _argv(pid)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        started_as_rank = b"-m" in argv and argv[argv.index(b"-m") + 1:][:1] == [b"uniter_ds.train.pretrain"]
        if started_as_rank and f"RANK={rank}".encode() in environ:
            return pid
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_a_killed_rank_takes_its_loader_workers_and_helpers_down(tmp_path):
    import os
    import signal
    import time

    _small_data(tmp_path / "data", 120)
    config = _config(tmp_path / "run", tmp_path / "data", num_workers=2, split="resampled")
    config["optim"]["total_steps"] = 5000
    config["tracking"]["log_every"] = 1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    runner = subprocess.Popen([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                               "uniter_ds.train.pretrain", "--config", str(tmp_path / "run.yaml")],
                              cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_until(lambda: _metric_rows(tmp_path / "run") >= 3, runner, "the job did not start training")
        rank1 = _rank_pid(runner.pid, 1)
        helpers = _descendants(rank1)  # its fork server, resource tracker and loader workers
        assert len(helpers) >= 3, helpers
        everything = _descendants(runner.pid)
        os.kill(rank1, signal.SIGKILL)
        assert runner.wait(timeout=60) != 0
        deadline = time.monotonic() + 20
        while any(map(_alive, everything)) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = {pid: b" ".join(_argv(pid))[:150] for pid in everything if _alive(pid)}
        assert not survivors, f"processes outlived the job: {survivors}; rank 1's were {sorted(helpers)}"
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)


def test_a_run_directory_holds_one_live_job(tmp_path):
    import os
    import signal
    import sys

    _small_data(tmp_path / "data", 60)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from uniter_ds.run_layout import lock_run_directory; "
                               "lock = lock_run_directory(Path(sys.argv[1])); print('locked', flush=True); "
                               "time.sleep(600)", str(tmp_path / "run")],
                              cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = _config(tmp_path / "run", tmp_path / "data")
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        cli = [sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(tmp_path / "run.yaml"), "--dry-run"]
        refused = subprocess.run(cli, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and f"pid {holder.pid} on" in refused.stderr, refused.stderr[-2000:]
        assert "is in use by a live job" in refused.stderr and "Traceback" not in refused.stderr
        # The ranks check too (a job started by the deepspeed launcher directly), all of them stopping.
        ranks = _launch(config, tmp_path / "run.yaml")
        assert ranks.returncode != 0 and "is in use by a live job" in ranks.stdout + ranks.stderr
        assert "Traceback" not in ranks.stdout + ranks.stderr
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        os.kill(holder.pid, signal.SIGKILL)  # a holder that dies releases the lock, however it dies
        holder.wait()
        allowed = subprocess.run(cli, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stderr[-2000:]
    finally:
        holder.kill()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_when_the_runner_is_killed_uniter_ds_waits_for_the_ranks_and_says_so(tmp_path):
    import os
    import signal
    import sys
    import time

    _small_data(tmp_path / "data", 60)
    config = _config(tmp_path / "run", tmp_path / "data")
    config["optim"]["total_steps"] = 30  # the ranks train on after the runner is gone: long enough to see it
    config["tracking"]["log_every"] = 1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cli = subprocess.Popen([sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(tmp_path / "run.yaml")],
                           cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        _wait_until(lambda: _metric_rows(tmp_path / "run") >= 2, cli, "the job did not start training")
        # the `deepspeed` script (argv[1]); its launcher.launch child and the ranks run `python -u -m ...`
        runner = next(pid for pid in _descendants(cli.pid) if b"deepspeed" in b"".join(_argv(pid)[1:2]))
        ranks = [_rank_pid(cli.pid, r) for r in (0, 1)]
        for pid in ranks:  # held until the runner is gone: a tiny job's last steps would end before any check
            os.kill(pid, signal.SIGSTOP)
        os.kill(runner, signal.SIGKILL)
        time.sleep(3)
        assert cli.poll() is None, "uniter-ds returned while the job's ranks still ran"
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        stderr = cli.communicate(timeout=300)[1]
        assert cli.returncode != 0
        assert "while the job's ranks still run" in stderr and "waiting for them to end" in stderr
        assert not any(_alive(pid) for pid in ranks)  # it returned only once they were gone
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)


def test_a_damaged_checkpoint_is_named_and_the_previous_one_taken(tmp_path):
    import sys

    _small_data(tmp_path / "data", 60)
    config = _config(tmp_path / "run", tmp_path / "data", split="resampled")
    config["checkpoint"] = {"every": 4, "at_end": True, "keep_last": 3}
    config["tracking"]["log_every"] = 1
    done = _launch(config, tmp_path / "run.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    straight = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    model_file = tmp_path / "run" / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # marked complete, then cut short

    export = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "export", str(tmp_path / "run"), "--out",
                             str(tmp_path / "export")], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "exported step 8" in export.stdout
    assert f"not the newest checkpoint: step00000012: {model_file} is 1000 bytes" in export.stderr

    (tmp_path / "run" / "metrics.jsonl").unlink()
    resumed = subprocess.run([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                              "uniter_ds.train.pretrain", "--config", str(tmp_path / "run.yaml"), "--resume"],
                             cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"step00000012 is damaged ({model_file} is 1000 bytes" in log and "at step 8" in log
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in again] == [9, 10, 11, 12]
    for row in again:  # continued exactly where the intact checkpoint left off
        assert row["loss"] == pytest.approx(straight[row["step"] - 1]["loss"], rel=1e-5)


def test_a_build_lock_left_by_a_killed_build_is_named_before_any_rank_starts(tmp_path):
    import os
    import sys

    _small_data(tmp_path / "data", 30)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(tmp_path / "run", tmp_path / "data")))
    extensions = tmp_path / "extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what a build killed midway leaves: a lock no live process holds
    env = cpu_env() | {"TORCH_EXTENSIONS_DIR": str(extensions)}
    cli = [sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", str(tmp_path / "run.yaml"), "--dry-run"]
    refused = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"Clear it with: rm {lock}" in refused.stderr, refused.stderr[-2000:]
    # A build in progress holds its lock open: that one is not stale, and the job may wait for it.
    builder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                                "print('holding', flush=True); time.sleep(600)", str(lock)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "holding"
        allowed = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stderr[-2000:]
    finally:
        builder.kill()
    os.remove(lock)


# ---------------------------------------------------------------------------------------------
# Bad input: refused by `uniter-ds pretrain` before any rank starts, exit 2, the key and file named
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    common = dict(images=24, seed=0, img_dim=64, min_regions=5, max_regions=10, max_shard_bytes=30_000)
    synth_dataset(root / "data", img_label_dim=41, **common)
    synth_dataset(root / "no-soft", img_label_dim=None, **common)
    shards = Manifest.load(root / "data").shards
    for name, damage in (("missing-shard", "delete"), ("short-shard", "truncate")):
        shutil.copytree(root / "data", root / name)
        shard = root / name / shards[1].name
        if damage == "delete":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:1000])
    (root / "empty").mkdir()
    (root / "bad.json").write_text("{not json")
    (root / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = _config(root / "run", root / "data")
    config["data"]["val"] = [str(root / "data")]
    (root / "good.yaml").write_text(yaml.safe_dump(config))
    return root


GRAPHABLE = ["--set", "model.cuda_graphs=true", "--set", "data.layout=packed", "--set", "data.batching=rows"]
BAD_INPUTS = [  # (what, --set overrides or extra arguments, what the error must say)
    ("unknown key", ["--set", "optim.lrr=3"], "config key 'optim.lrr' is unknown"),
    ("wrong type", ["--set", "optim.lr=abc"], "config key 'optim.lr': expected float"),
    ("not a choice", ["--set", "data.split=bogus"], "config key 'data.split'"),
    ("unknown task", ["--set", "data.train.0.tasks.vqa=1"], "config key 'data.train.0.tasks.vqa'"),
    ("mix ratio <= 0", ["--set", "data.train.0.tasks.mlm=0"], "config key 'data.train.0.tasks.mlm'"),
    ("skip fraction > 1", ["--set", "data.max_skip_fraction=2"], "config key 'data.max_skip_fraction'"),
    ("a relative typo", ["--set", "data.train.0.paths=[dta]"], "config key 'data.train.0.paths': dta"),
    ("a missing absolute path", ["--set", "data.train.0.paths=[/no/such/data]"],
     "config key 'data.train.0.paths': /no/such/data: matches no dataset folder"),
    ("an empty dataset folder", ["--set", "data.train.0.paths=[{root}/empty]"],
     "config key 'data.train.0.paths': {root}/empty: no manifest.json"),
    ("a missing validation path", ["--set", "data.val=[{root}/nowhere]"], "config key 'data.val': {root}/nowhere"),
    ("features unlike the model's", ["--set", "model.overrides.img_dim=128"],
     "config key 'data.train.0.paths': {root}/data: dataset does not match: img_dim: data has 64-d features"),
    ("no soft labels for MRC", ["--set", "data.train.0.paths=[{root}/no-soft]", "--set", "data.train.0.tasks.mrc=1"],
     "config key 'data.train.0.paths': {root}/no-soft: dataset does not match: img_label_dim"),
    ("a shard the manifest lists, missing", ["--set", "data.train.0.paths=[{root}/missing-shard]"],
     "config key 'data.train.0.paths': 1 shard(s) unlike their manifest: {root}/missing-shard/"),
    ("a truncated shard", ["--set", "data.train.0.paths=[{root}/short-shard]"],
     "(1000 bytes, the manifest says"),
    ("init weights that do not exist", ["--set", "model.init_from=hf:/no/such/export"],
     "config key 'model.init_from': /no/such/export does not exist"),
    ("init weights of no known kind", ["--set", "model.init_from=weights:/x"], "config key 'model.init_from'"),
    ("a missing model config file", ["--set", "model.config_file=/no/such.json"],
     "config key 'model.config_file': /no/such.json does not exist"),
    ("a missing deepspeed config", ["--set", "deepspeed_config=/no/such/ds.json"],
     "config key 'deepspeed_config': /no/such/ds.json does not exist"),
    ("a deepspeed config that is not JSON", ["--set", "deepspeed_config={root}/bad.json"],
     "config key 'deepspeed_config': {root}/bad.json is not valid JSON"),
    ("a resume path that does not exist", ["--resume", "{root}/no-checkpoint"],
     "--resume {root}/no-checkpoint: does not"),
    ("row batching without the packed layout", ["--set", "data.batching=rows"], "config key 'data.batching'"),
    ("CUDA graphs over ever-new shapes", ["--set", "model.cuda_graphs=true"],
     "config key 'model.cuda_graphs': needs one encoder shape per run"),
    ("CUDA graphs over nested attention", [*GRAPHABLE, "--set", "model.packed_attention=nested"],
     "config key 'model.cuda_graphs': the nested attention's shapes change with every batch"),
    ("CUDA graphs under ZeRO-3", [*GRAPHABLE, "--set", "deepspeed_config={root}/zero3.json"],
     "config key 'model.cuda_graphs' with {root}/zero3.json: not with ZeRO-3"),
    ("CUDA graphs without a GPU", GRAPHABLE, "config key 'model.cuda_graphs': CUDA graphs need a CUDA GPU"),
]


@pytest.mark.parametrize("what,arguments,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_before_any_rank_starts(inputs, capsys, what, arguments, message):
    from uniter_ds.cli import main

    arguments = [a.replace("{root}", str(inputs)) for a in arguments]
    assert main(["pretrain", "--config", str(inputs / "good.yaml"), "--dry-run", *arguments]) == 2
    err = capsys.readouterr().err
    assert message.replace("{root}", str(inputs)) in err, err
    assert "Traceback" not in err


def test_compile_under_zero3_is_refused_where_torch_would_train_it_wrong(inputs, capsys, monkeypatch):
    """torch 2.11 compiles DeepSpeed's ZeRO-3 linear with wrong gradients (pytorch/pytorch#180642)."""
    from uniter_ds.cli import main
    from uniter_ds.model import acceleration

    (inputs / "zero3-torch-linear.json").write_text(json.dumps({"zero_optimization": {
        "stage": 3, "memory_efficient_linear": False}}))
    run = ["pretrain", "--config", str(inputs / "good.yaml"), "--dry-run", "--set", "model.compile=true"]
    monkeypatch.setattr(acceleration, "torch_version", lambda: acceleration.TORCH_WITH_INPLACE_FUNCTION_BUG)
    assert main([*run, "--set", f"deepspeed_config={inputs}/zero3.json"]) == 2
    err = capsys.readouterr().err
    assert f"config key 'model.compile' with {inputs}/zero3.json: " in err and "memory_efficient_linear" in err, err
    assert "Traceback" not in err
    assert main([*run, "--set", f"deepspeed_config={inputs}/zero3-torch-linear.json"]) == 0
    monkeypatch.setattr(acceleration, "torch_version", lambda: (2, 13))
    assert main([*run, "--set", f"deepspeed_config={inputs}/zero3.json"]) == 0


def test_the_good_input_of_the_bad_input_table_is_accepted(inputs, capsys):
    from uniter_ds.cli import main

    assert main(["pretrain", "--config", str(inputs / "good.yaml"), "--dry-run"]) == 0
    skip = ["--set", f"data.train.0.paths=[{inputs}/short-shard]", "--set", "data.on_error=skip"]
    assert main(["pretrain", "--config", str(inputs / "good.yaml"), "--dry-run", *skip]) == 0  # warned, counted
    assert "skipped and counted when read" in capsys.readouterr().err


def test_a_full_disk_during_a_save_says_so_and_leaves_latest_intact(tmp_path, monkeypatch):
    """torch's writer says "basic_ios::clear: iostream error" when the disk fills; the save says what it is."""
    from collections import namedtuple

    from uniter_ds.train import checkpointing

    root = tmp_path / "checkpoints"
    (root / "step00000004").mkdir(parents=True)
    (root / "latest").write_text("step00000004")

    class FillingEngine:
        def save_checkpoint(self, save_dir, tag, **_):
            (Path(save_dir) / tag).mkdir()
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(checkpointing.DiskFull, match=r"no space left on device while saving .*step00000008 "
                       r"\(4096 bytes free; RuntimeError: .*unexpected pos.*step00000004 \(latest\) is intact"):
        checkpointing.save(FillingEngine(), root, 8, {}, keep_last=2)
    assert not (root / "step00000008").exists() and (root / "latest").read_text() == "step00000004"
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: usage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left: not a full disk, passed on as is
        checkpointing.save(FillingEngine(), root, 12, {}, keep_last=2)


def _last_per_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step."""
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()]


def _resume_config(root: Path, name: str) -> Path:
    # Two loader workers per stream and three streams: each resumes where it stood (data.resume exact).
    config = _config(root / name, root / "data", split="resampled", num_workers=2)
    config["data"]["train"][0]["tasks"] = {"mlm": 2, "itm": 1, "mrc-kl": 1}
    config["optim"]["total_steps"] = 16
    config["checkpoint"] = {"every": 4, "at_end": True, "keep_last": 2}
    config["tracking"] = {"log_every": 1, "mlflow": name != "straight"}
    config["export_at_end"] = True
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return root / f"{name}.yaml"


@pytest.fixture(scope="module")
def straight_16_steps(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    _small_data(root / "data", 120)
    config = _resume_config(root, "straight")
    assert _launch(yaml.safe_load(config.read_text()), config).returncode == 0
    return root


def _kill_rank_during(root: Path, name: str, moment: str) -> None:
    """Start the job and kill -9 a rank: mid-step (rank 1, after step 6, between the checkpoints of steps
    4 and 8) or mid-save (rank 0 kills itself once it has written its first file of step 8's checkpoint,
    before the checkpoint is complete: tests/dist/killed_mid_save.py)."""
    import os
    import signal

    module, env = "uniter_ds.train.pretrain", cpu_env()
    if moment == "mid-save":
        module, env = "tests.dist.killed_mid_save", env | {"KILL_MID_SAVE_RANK": "0",
                                                           "KILL_MID_SAVE_TAG": "step00000008"}
    command = [deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module", module,
               "--config", str(root / f"{name}.yaml")]
    runner = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        if moment == "mid-step":
            checkpoints = root / name / "checkpoints"
            past_step_6 = lambda: (checkpoints / "step00000004" / "complete.json").exists() and len(  # noqa: E731
                _last_per_step(root / name)) >= 6
            _wait_until(past_step_6, runner, "the job did not get past step 6", every=0.05)
            os.kill(_rank_pid(runner.pid, 1), signal.SIGKILL)
        assert runner.wait(timeout=300) != 0
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("moment", ["mid-step", "mid-save"])
def test_kill_9_of_a_rank_then_resume_ends_where_the_uninterrupted_run_ends(straight_16_steps, moment):
    import mlflow
    import numpy as np
    from safetensors.numpy import load_file

    root, name = straight_16_steps, f"killed-{moment}"
    _resume_config(root, name)
    _kill_rank_during(root, name, moment)
    if moment == "mid-save":
        half_written = root / name / "checkpoints" / "step00000008"
        assert any(half_written.iterdir()) and not (half_written / "complete.json").exists()
    killed_at = max(_last_per_step(root / name))
    assert 6 <= killed_at < 16
    run_id = json.loads((root / name / "mlflow_run.json").read_text())["run_id"]
    command = [deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
               "uniter_ds.train.pretrain", "--config", str(root / f"{name}.yaml"), "--resume"]
    resumed = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    # Mid-save: the last complete checkpoint is step 4's; mid-step: 4 or 8, by how far the job had got.
    resumed_at = ("4",) if moment == "mid-save" else ("4", "8")
    assert any(f"at step {step}" in log for step in resumed_at) and "resumed from" in log
    assert "replaying" not in log  # each loader worker restored, nothing re-read
    assert list((root / name / "checkpoints").glob("step*/rank1_state.pt"))
    # The same pairs in every micro-batch of every step on both ranks, each step logged once.
    for rank in (0, 1):
        logs = [[json.loads(line) for line in (root / run / f"rank{rank}.jsonl").read_text().splitlines()]
                for run in ("straight", name)]
        assert [row["step"] for row in logs[1]] == list(range(1, 17))
        assert logs[1] == logs[0], f"rank {rank}: other batches after the resume"
    assert _steps(root / name / "metrics.jsonl") == list(range(1, 17))
    # One MLflow run: reopened by the resume, every step in its history, closed as finished.
    assert json.loads((root / name / "result.json").read_text())["mlflow_run_id"] == run_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / name / 'mlflow.db'}")
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(1, 17))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] in resumed_at
    straight, again = _last_per_step(root / "straight"), _last_per_step(root / name)
    for step in range(5, 17):
        for key in [k for k in straight[step] if k.startswith("train/")]:
            assert again[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-7), (step, key)
    a = load_file(str(root / "straight" / "export" / "hf" / "model.safetensors"))
    b = load_file(str(root / name / "export" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("file", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank1_state.pt"])
def test_resume_from_a_checkpoint_file_that_would_run_code_refuses_it(straight_16_steps, file):
    """``--resume`` from someone else's checkpoint: a pickled payload in a file DeepSpeed reads (an optimizer
    shard) or in one uniter-ds reads (a rank's data state), sizes forged in complete.json, runs nothing;
    the rank stops naming the file."""
    from .helpers import poison_checkpoint_file

    root, name = straight_16_steps, f"poisoned-{file.split('_')[0]}"
    shutil.copytree(root / "straight", root / name)
    marker = root / f"{name}.MARKER"
    latest = root / name / "checkpoints" / (root / name / "checkpoints" / "latest").read_text().strip()
    poisoned = next(latest.glob(f"*{file}"))
    poison_checkpoint_file(poisoned, marker)
    config = yaml.safe_load(_resume_config(root, name).read_text())
    result = subprocess.run([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                             "uniter_ds.train.pretrain", "--config", str(root / f"{name}.yaml"), "--resume"],
                            cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert config["run_dir"] == str(root / name) and result.returncode != 0
    log = result.stdout + result.stderr
    assert f"stopped: {poisoned}: refused: it names io.open" in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert not marker.exists()


def test_a_rank_waiting_at_start_up_says_what_for(tmp_path):
    """Rank 0 of a 2-rank job started alone waits for rank 1 at the rendezvous: it says so, naming the
    address, instead of hanging silently."""
    import sys

    _small_data(tmp_path / "data", 40)
    path = tmp_path / "alone.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "alone", tmp_path / "data")))
    port = free_port()
    env = cpu_env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "UNITER_DS_WAIT_NOTICE_S": "2"}
    import threading

    waiting = subprocess.Popen([sys.executable, "-m", "uniter_ds.train.pretrain", "--config", str(path)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, waiting.kill)  # it never ends by itself: rank 1 never comes
    watchdog.start()
    notice = f"rank 0: still waiting for the 2 ranks of the job to join at 127.0.0.1:{port}"
    seen = []
    try:
        for line in waiting.stderr:  # read until the notice (or the watchdog's kill ends the stream)
            seen.append(line)
            if notice in line:
                break
    finally:
        watchdog.cancel()
        waiting.kill()
        waiting.wait()
    assert any(notice in line for line in seen), "".join(seen)[-2000:]


def test_an_unreachable_tracking_server_costs_the_job_seconds_and_no_metric(tmp_path):
    """Finding 10 in a real job: MLFLOW_TRACKING_URI names a port nobody listens on. MLflow's own retries
    held the start ~4 min 20 s; now the job starts at once, says it retries, trains to the end and
    metrics.jsonl has every step."""
    import time

    _small_data(tmp_path / "data", 60)
    config = _config(tmp_path / "run", tmp_path / "data", split="resampled")
    config["optim"]["total_steps"] = 6
    config["tracking"] = {"mlflow": True, "log_every": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = cpu_env() | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(name, None)  # as a user's shell has them: the job's own defaults apply
    started = time.monotonic()
    done = subprocess.run([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "uniter_ds.train.pretrain", "--config", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "cannot be opened" in log and "retrying in" in log
    assert elapsed < 120, elapsed  # ~20-40 s here; MLflow's defaults alone took ~260 s
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            ] == list(range(1, 7))
