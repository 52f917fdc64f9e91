"""Benchmark foundations: the FLOP formula and the baseline's like-for-like loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from uniter_ds.bench.baseline import BaselineUniter
from uniter_ds.bench.flops import non_embedding_parameters, training_flops, training_flops_per_sample
from uniter_ds.model import TASKS, UniterConfig, UniterForPretraining, build_batch

from .helpers import collate, random_sample
from .launcher import free_port


def test_flop_formula_matches_a_count_of_the_real_encoder(tiny_config):
    model = UniterForPretraining(tiny_config).eval()
    layers = model.uniter.encoder.layers
    assert non_embedding_parameters(tiny_config) == sum(p.numel() for p in layers.parameters())
    tokens = 23
    x = torch.randn(1, tokens, tiny_config.hidden_size)
    mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        for layer in layers:
            layer(x, mask)
    projections = counter.get_total_flops()  # torch counts the Linear matmuls (not SDPA on the CPU)
    # By hand: per projection 2 x in x out per token; attention QK^T and AV are 2 T^2 d each per layer.
    by_hand = sum(2 * m.in_features * m.out_features * tokens for m in layers.modules()
                  if isinstance(m, torch.nn.Linear))
    assert projections == by_hand
    attention = tiny_config.num_hidden_layers * 2 * (2 * tokens * tokens * tiny_config.hidden_size)
    # Backward = 2 x forward; the formula also charges 6 FLOPs per bias / LayerNorm parameter per token.
    elementwise = sum(p.numel() for p in layers.parameters() if p.ndim == 1)
    assert training_flops_per_sample(tiny_config, tokens) == 3 * (projections + attention) + 6 * elementwise * tokens


def test_flop_formula_against_the_published_anchor():
    large = UniterConfig.from_preset("large")
    assert training_flops_per_sample(large, 128) == pytest.approx(237e9, rel=0.01)
    assert training_flops_per_sample(large, 160) == pytest.approx(298e9, rel=0.01)
    assert training_flops(large, [128, 160]) == training_flops_per_sample(large, 128) + training_flops_per_sample(
        large, 160)


@pytest.mark.parametrize("task", TASKS)
def test_baseline_computes_the_same_loss_on_the_same_batch_and_weights(tiny_config, task):
    torch.manual_seed(0)
    ours = UniterForPretraining(tiny_config).eval()
    baseline = BaselineUniter.from_uniter(ours).eval()
    g = torch.Generator().manual_seed(4)
    batch = collate([random_sample(tiny_config, t, r, g) for t, r in [(6, 4), (12, 9), (4, 11)]], [1, 0, 1])
    with torch.no_grad():
        expected = ours(batch, task)
        got = baseline(batch, task)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.item_losses, expected.item_losses, atol=1e-5, rtol=1e-5)


def test_baseline_runs_the_padded_layout(tiny_config):
    baseline = BaselineUniter.from_uniter(UniterForPretraining(tiny_config))
    ids = [torch.tensor([2, 7, 3]), torch.tensor([2, 7, 8, 9, 3])]
    batch = build_batch(ids, [torch.rand(6, 64), torch.rand(2, 64)], [torch.rand(6, 7), torch.rand(2, 7)])
    assert baseline.sequence_length(batch) == 5 + 6 and batch.seq_len == 9


FIELDS = {"samples_per_s", "tokens_per_s", "padded_tokens_per_s", "padding_fraction", "step_time_s", "tflops",
          "mfu", "peak", "memory", "per_task_step_time_s", "kernels", "window_samples_per_s", "precision",
          "total_samples_per_s", "world_size"}
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(args: list[str], timeout: int = 600):
    import subprocess
    import sys

    from .launcher import ROOT, cpu_env

    result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", *args], cwd=ROOT, env=cpu_env(),
                            capture_output=True, text=True, timeout=timeout)
    return result


def assert_plots(report: dict, folder, expected: int) -> None:
    assert len(report["plots"]) == expected
    for name in report["plots"]:
        assert (folder / name).read_bytes()[:8] == PNG


@pytest.mark.parametrize("command", ["train", "compare"])
def test_bench_cli_writes_every_field(tmp_path, command):
    out = tmp_path / "report.json"
    result = run_cli(["bench", command, "--preset", "tiny", "--precision", "fp32", "--zero", "0",
                      "--token-budget", "600", "900", "--batches", "1", "--warmup", "1", "--windows", "1", "--steps",
                      "2", "--profile", "1", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [run["token_budget"] for run in report["runs"]] == [600, 900]
    assert {"device", "git_commit", "versions", "date"} <= set(report["environment"])
    assert report["settings"]["preset"] == "tiny" and report["settings"]["zero_stage"] == 0
    for run in report["runs"]:
        ours = run["ours"]
        assert set(ours) >= FIELDS and ours["steps"] == 2
        assert ours["warmup"]["steps"] == 4 and 0 < ours["warmup"]["first_step_s"] <= ours["warmup"]["seconds"]
        assert ours["compile_s"] is None  # not compiled
        assert ours["peak"]["what"].startswith("CPU: measured fp32")
        assert 0 <= ours["padding_fraction"] < 1 and ours["tflops"] > 0
        # The warm-up ran each of the 4 tasks' pre-built batches once; then the tasks take turns again.
        assert set(ours["per_task_step_time_s"]) == {"mlm", "itm"}
        assert ours["budget_fill"] == pytest.approx(ours["mean_padded_tokens_per_micro_batch"] / run["token_budget"])
        assert ours["mean_real_tokens_per_micro_batch"] <= ours["mean_padded_tokens_per_micro_batch"] <= 900
        assert ours["status"] == "ok" and ours["kernels"]["sdpa_backend_ran"] == "math"  # CPU, dropout 0.1
        assert {key: ours["kernels"][key] for key in ("layout", "torch.compile", "cuda_graphs", "adamw")} == {
            "layout": "padded", "torch.compile": "off", "cuda_graphs": "off", "adamw": "torch"}
        assert ("profile" in ours) == (run["token_budget"] == 900)  # the largest budget by default
        if "profile" in ours:
            profile = ours["profile"]
            assert sum(profile["by_kind_percent"].values()) == pytest.approx(100, abs=0.5)
            assert profile["by_kind_percent"]["GEMM"] > 0 and profile["top"]
            assert profile["busy_fraction"] > 0
        if command == "compare":
            assert set(run["baseline"]) >= FIELDS
            assert run["speedup_samples_per_s"] == pytest.approx(ours["samples_per_s"] /
                                                                 run["baseline"]["samples_per_s"])
            # The baseline pads text and regions separately: never less padding than the compact layout.
            assert run["baseline"]["padding_fraction"] >= ours["padding_fraction"]
    assert_plots(report, tmp_path, 3 if command == "compare" else 2)


def test_bench_under_the_launcher_gathers_every_rank(tmp_path):
    """2 CPU ranks, the live shard reader, accumulation 2: rank 0 reports per-GPU and total numbers that
    add up over the ranks, for ours and for the DDP baseline."""
    out = tmp_path / "report.json"
    result = run_cli(["bench", "compare", "--num-gpus", "2", "--master-port", str(free_port()), "--preset", "tiny",
                      "--precision", "fp32", "--zero", "2", "--token-budget", "700", "--source", "shards",
                      "--workers", "1", "--accumulation", "2", "--warmup", "1", "--windows", "1", "--steps", "2",
                      "--tasks", "mlm", "mrfr", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-plots"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert report["launcher"]["world_size"] == 2 and "--num-gpus" not in report["command"]
    for system in ("ours", "baseline"):
        result = run[system]
        per_rank = result["per_rank_samples_per_s"]
        assert result["world_size"] == 2 and len(per_rank) == 2 and all(rate > 0 for rate in per_rank)
        assert result["total_samples_per_s"] == pytest.approx(sum(per_rank))
        assert result["samples_per_s"] == pytest.approx(sum(per_rank) / 2)
    assert "DDP" in run["baseline"]["system"]
    ratio = run["ours"]["samples_per_s"] / run["baseline"]["samples_per_s"]
    assert run["speedup_samples_per_s"] == pytest.approx(ratio)
    assert report["settings"]["accumulation"] == 2 and report["settings"]["source"] == "shards"


def _threshold_probe(threshold: int):
    from uniter_ds.bench.memory import Probe

    return lambda budget: Probe(budget, budget <= threshold, budget / 1000, "fake")


@pytest.mark.parametrize("threshold", [300, 512, 700, 1023, 1024, 1500, 2048, 5000, 9000, 20000, 100000])
@pytest.mark.parametrize("start", [512, 1024, 4096])
def test_memory_search_finds_the_largest_budget_that_fits(threshold, start):
    from uniter_ds.bench.memory import search_largest

    resolution, maximum = 256, 16384
    largest, probes = search_largest(_threshold_probe(threshold), start, maximum, resolution)
    if threshold < resolution:
        assert largest is None
        return
    if threshold >= maximum:
        assert largest == maximum
    else:
        assert largest <= threshold < largest + resolution  # within the resolution of the true limit
    assert any(p.token_budget == largest and p.fits for p in probes)
    assert len(probes) <= 2 * (maximum // resolution).bit_length() + 2  # a search, not a scan


def test_bench_memory_cli_probes_real_steps(tmp_path):
    out = tmp_path / "memory.json"
    result = run_cli(["bench", "memory", "--preset", "tiny", "--precision", "fp32", "--zero", "0", "--tasks", "mlm",
                      "--limit-gb", "100", "--start", "512", "--max-budget", "1024", "--resolution", "512",
                      "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["largest_token_budget"] == 1024
    assert {"device", "git_commit", "versions", "date"} <= set(report["environment"])
    assert [p["token_budget"] for p in report["probes"]] == [512, 1024]
    assert all(0.1 < p["peak_gb"] < 100 for p in report["probes"])
    assert_plots(report, tmp_path, 1)
    # With a limit below what the process itself needs, nothing fits, and the exit status says so.
    result = run_cli(["bench", "memory", "--preset", "tiny", "--precision", "fp32", "--zero", "0", "--tasks", "mlm",
                      "--limit-gb", "0.01", "--start", "512", "--max-budget", "512", "--resolution", "512",
                      "--data-dir", str(tmp_path / "data"), "--no-plots"])
    assert result.returncode == 1 and "largest token budget that fits: none" in result.stdout
    result = run_cli(["bench", "memory", "--preset", "tiny"])
    assert result.returncode == 2 and "--limit-gb" in result.stderr


def test_bench_data_cli(tmp_path):
    out = tmp_path / "data.json"
    result = run_cli(["bench", "data", "--regions", "12", "5-20", "--images", "60", "--tasks", "mlm", "itm",
                      "--workers", "0", "--seconds", "0.3", "--token-budget", "512", "--data-dir", str(tmp_path / "d"),
                      "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["regions"], r["task"]) for r in report["rows"]] == [("12", "mlm"), ("12", "itm"), ("5-20", "mlm"),
                                                                   ("5-20", "itm")]
    assert all(r["samples_per_s"] > 0 and r["batches"] > 0 for r in report["rows"])
    assert report["rows"][0]["padding_fraction"] < report["rows"][2]["padding_fraction"]  # fixed counts pad less
    assert_plots(report, tmp_path, 1)
    out = tmp_path / "http.json"
    result = run_cli(["bench", "data", "--regions", "12", "--images", "60", "--tasks", "mlm", "--workers", "0",
                      "--seconds", "0.3", "--token-budget", "512", "--data-dir", str(tmp_path / "d"), "--via", "local",
                      "http", "--out", str(out), "--no-plots"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["via"] for r in rows] == ["local", "http"] and all(r["batches"] > 0 for r in rows)
    result = run_cli(["bench", "data", "--regions", "ten", "--data-dir", str(tmp_path / "d")])
    assert result.returncode == 2 and "'ten'" in result.stderr


# Kind of each kernel row recorded in a real profile (H200, UNITER-large bf16, tests/data/), by a
# distinctive part of its name.
RECORDED_KINDS = {
    "sdpa_sm90_flash_fprop": "attention", "sdpa_sm90_flash_bprop": "attention", "compute_dot_do_o": "attention",
    "nvjet_sm90": "GEMM", "CatArrayBatchedCopy": "copies and layout", "direct_copy_kernel": "copies and layout",
    "GammaBetaBackward": "layer norm", "layer_norm": "layer norm",
    "Gelu": "elementwise (GELU, dropout, add, reductions)",
    "reduce_kernel": "elementwise (GELU, dropout, add, reductions)",
    "CUDAFunctor_add": "elementwise (GELU, dropout, add, reductions)",
    "fused_dropout": "elementwise (GELU, dropout, add, reductions)",
    "masked_scale": "elementwise (GELU, dropout, add, reductions)",
    "multi_tensor_apply": "optimizer", "Optimizer.step#": "optimizer", "radix_sort": "indexing",
    "segment": "indexing", "unique_by_key": "indexing", "scan::": "indexing",
}


def test_gpu_profile_classifier_on_recorded_kernel_rows():
    from uniter_ds.bench.throughput import classify, is_annotation, summarize_profile

    recorded = json.loads((Path(__file__).parent / "data" / "h200_profile_rows.json").read_text())["rows"]
    for row in recorded:
        expected = next(kind for part, kind in RECORDED_KINDS.items() if part in row["name"])
        assert classify(row["name"], on_gpu=True).startswith(expected), row["name"]
    assert [row["name"] for row in recorded if is_annotation(row["name"])] == ["Optimizer.step#AdamW.step"]
    timed = [row for row in recorded if row["self_us"] is not None and not is_annotation(row["name"])]
    summary = summarize_profile(timed, on_gpu=True)
    assert summary["total_ms"] == pytest.approx(sum(row["self_us"] for row in timed) / 1e3)
    assert summary["by_kind_percent"]["GEMM"] > summary["by_kind_percent"]["attention"] > 10
    assert "other" not in summary["by_kind_percent"]


def test_profile_rows_take_kernels_once():
    """On a GPU only the device rows count, and a user annotation spanning kernels is not a kernel."""
    from types import SimpleNamespace

    from uniter_ds.bench.throughput import profile_rows

    def event(key, device_type, us, annotation=False):
        return SimpleNamespace(key=key, device_type=f"DeviceType.{device_type}", self_device_time_total=us,
                               self_cpu_time_total=us, count=1, is_user_annotation=annotation)

    events = [event("aten::mm", "CPU", 0), event("nvjet_sm90_tst_128x256", "CUDA", 900),
              event("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda::{lambda()#3}>", "CUDA", 7),
              event("Optimizer.step#AdamW.step", "CUDA", 500, annotation=True),
              event("multi_tensor_apply_kernel", "CUDA", 400), event("aten::addmm", "CPU", 50)]
    rows = profile_rows(events, on_gpu=True)
    assert [row["name"][:20] for row in rows] == ["nvjet_sm90_tst_128x2", "void at::native::unr",
                                                  "multi_tensor_apply_k"]
    assert len(profile_rows(events, on_gpu=False)) == 5  # CPU self times: every row with time


def test_sweep_records_out_of_memory_and_skips_larger_budgets():
    import torch

    from uniter_ds.bench.throughput import BenchSettings, is_out_of_memory, sweep

    def measure(settings):
        if settings.token_budget >= 2000:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return {"budget": settings.token_budget}

    recorded = []
    sweep(BenchSettings(), [4000, 1000, 2000], measure, lambda b, r: recorded.append((b, r)), torch.device("cpu"))
    assert [(b, r["status"]) for b, r in recorded] == [(1000, "ok"), (2000, "out of memory"), (4000, "not tried")]
    assert "CUBLAS_STATUS_ALLOC_FAILED" in recorded[1][1]["error"]
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and not is_out_of_memory(ValueError("shape mismatch"))
    with pytest.raises(ValueError):  # anything else is a bug, not a result
        sweep(BenchSettings(), [1000], lambda s: (_ for _ in ()).throw(ValueError("shape mismatch")),
              lambda b, r: None, torch.device("cpu"))


def test_report_survives_a_failure_after_a_measurement(tmp_path, monkeypatch):
    """The JSON is rewritten after every measurement: when the baseline crashes, ours is in the file."""
    import torch

    from uniter_ds import cli
    from uniter_ds.bench import throughput

    def fake_ours(settings, budgets, record, *args):
        for budget in budgets:
            record(budget, {"status": "ok", "samples_per_s": 10.0, "tokens_per_s": 900.0, "tflops": 1.0,
                            "mean_real_tokens_per_micro_batch": 500.0, "padding_fraction": 0.05,
                            "step_time_s": {"median": 0.5}, "budget": budget, "world_size": 1,
                            "memory": {"host_peak_rss_gb": 1.0}})

    def crashing_baseline(settings, budgets, record):
        record(budgets[0], {"status": "out of memory", "error": "CUDA out of memory"})
        raise RuntimeError("the baseline crashed")

    monkeypatch.setattr(throughput, "bench_ours", fake_ours)
    monkeypatch.setattr(throughput, "bench_baseline", crashing_baseline)
    monkeypatch.setattr(throughput, "device_peak", lambda device, precision: (2.0, "fake peak"))
    monkeypatch.setattr("uniter_ds.train.distributed.init_distributed", lambda: (0, 1, torch.device("cpu")))
    out = tmp_path / "report.json"
    with pytest.raises(RuntimeError, match="the baseline crashed"):
        cli.main(["bench", "compare", "--preset", "tiny", "--token-budget", "600", "900", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert [run["ours"]["budget"] for run in report["runs"]] == [600, 900]
    assert report["runs"][0]["ours"]["mfu"] == 0.5
    assert report["runs"][0]["baseline"]["status"] == "out of memory" and "baseline" not in report["runs"][1]
    assert not list(tmp_path.glob("*.partial"))


def test_environment_without_a_git_binary(tmp_path, monkeypatch):
    import shutil
    import subprocess

    import torch

    from uniter_ds.bench.throughput import environment, git_commit

    if shutil.which("git") is None:
        pytest.skip("the reference value needs git")  # CI and development machines have it
    expected = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH, as on the GPU machines
    assert git_commit() == expected
    assert environment(torch.device("cpu"))["git_commit"] == expected
    assert git_commit(tmp_path) == "unknown"  # no .git above it either
    monkeypatch.setenv("UNITER_DS_GIT_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"


def test_precision_follows_what_the_cpu_does_natively():
    from uniter_ds.bench.throughput import cpu_native_bf16, default_precision

    assert default_precision(on_gpu=True, flags=set()) == "bf16"
    assert default_precision(on_gpu=False, flags={"avx2", "fma"}) == "fp32"
    assert default_precision(on_gpu=False, flags={"avx512f", "avx512_bf16"}) == "bf16"
    assert default_precision(on_gpu=False, flags={"amx_bf16"}) == "bf16"
    assert cpu_native_bf16({"fp", "asimd", "bf16"})  # Arm


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --cpu-dry-run: every step of the GPU check on the CPU with the tiny
    preset, so the script cannot rot between GPU windows; at most 8 files come back."""
    import subprocess
    import sys

    from .launcher import ROOT, cpu_env

    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT,
                            env=cpu_env() | {"OUT": str(out), "PYTHON": sys.executable}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (out / "check.log").read_text()[-5000:] if (out / "check.log").exists() else \
        result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"check.log", "summary.json", "results.tar.gz", "compare.json"} <= set(files)
    rows = json.loads((out / "summary.json").read_text())["rows"]
    # the baseline is plain PyTorch (no ZeRO stage)
    assert {(row["system"], row["variant"], row["zero"]) for row in rows if row["status"] == "ok"} == {
        ("ours", "eager", 2), ("baseline", "eager", None), ("ours", "compiled, packed 256, rows", 1),
        ("ours", "compiled, packed 256, rows", 2), ("ours", "packed 256, rows", 2)}
    kernels = {row["variant"]: row["kernels"] for row in rows if row["system"] == "ours" and row["zero"] == 2}
    # --packed-attention auto: length buckets on CPU (nested in the GPU form of the check)
    assert kernels["packed 256, rows"]["layout"] == ("packed, 4 rows of 256 (row-filling batcher), samples gathered "
                                                     "into length buckets")
    assert kernels["packed 256, rows"]["sdpa_backend_ran"] == "math"
    assert kernels["compiled, packed 256, rows"]["torch.compile"] == "encoder layers, IPOT"
    assert all(row["status"] == "ok" for row in rows)


def test_the_gpu_check_stops_within_its_time_budget(tmp_path):
    """GPU_CHECK_SECONDS bounds the whole check (the device tool's window is 7 minutes): the steps get
    what is left of it, those with under 10 s left are skipped, and the check fails saying so.
    GPU_CHECK_STEPS (a rerun in the same window) runs only the steps it names."""
    import re
    import subprocess
    import sys

    from .launcher import ROOT, cpu_env

    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT,
                            env=cpu_env() | {"OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SECONDS": "11",
                                             "GPU_CHECK_STEPS": "syncs compare compiled combined"},
                            capture_output=True, text=True, timeout=120)
    log = (out / "check.log").read_text()
    assert result.returncode != 0, log
    assert "== syncs (limit 11s)" in log, log  # started with 11 s left: cut there, or done sooner
    assert int(re.search(r"^== syncs: exit \d+ after (\d+)s", log, re.M).group(1)) <= 12, log
    for name in ("tests", "packed"):
        assert f"== {name}: not selected (GPU_CHECK_STEPS)\n" in log and f"== {name} (" not in log, log
    for name in ("compare", "compiled", "combined"):
        assert re.search(rf"^== {name}: skipped, [0-9]s left of the check's 11s$", log, re.M), log
    assert json.loads((out / "summary.json").read_text())["rows"]  # one row per missing report, still written


@pytest.mark.parametrize("device, preset, budget", [("cpu", "large", 4096), ("cuda", "large", 49152),
                                                    ("cuda", "base", 49152), ("cuda", "tiny", 4096)])
def test_the_default_token_budget_keeps_a_gpu_busy(device, preset, budget, tmp_path, monkeypatch):
    """Without --token-budget a GPU gets 48k-token micro-batches (a 4k one leaves it waiting on launches)."""
    import torch

    from uniter_ds import cli
    from uniter_ds.bench import throughput

    measured = []
    monkeypatch.setattr(throughput, "bench_ours", lambda settings, budgets, record, *args: measured.extend(budgets))
    monkeypatch.setattr(throughput, "device_peak", lambda device, precision: (2.0, "fake peak"))
    monkeypatch.setattr(throughput, "environment", lambda device: {"device": device.type})
    monkeypatch.setattr("uniter_ds.train.distributed.init_distributed", lambda: (0, 1, torch.device(device)))
    cli.main(["bench", "train", "--preset", preset, "--out", str(tmp_path / "report.json")])
    assert measured == [budget]
