"""Benchmark foundations: the FLOP formula and the baseline's like-for-like loss."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from uniter_ds.bench.baseline import BaselineUniter
from uniter_ds.bench.flops import non_embedding_parameters, training_flops, training_flops_per_sample
from uniter_ds.model import TASKS, UniterConfig, UniterForPretraining, build_batch

from .helpers import collate, random_sample


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
          "mfu", "peak", "memory", "per_task_step_time_s", "kernels", "window_samples_per_s", "precision"}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_bench_cli_writes_every_field(tmp_path, command):
    import json
    import subprocess
    import sys

    from .launcher import ROOT, cpu_env

    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "uniter_ds.cli", "bench", command, "--preset", "tiny", "--precision", "fp32",
         "--zero", "0", "--token-budget", "600", "--batches", "1", "--warmup", "1", "--windows", "1", "--steps", "2",
         "--data-dir", str(tmp_path / "data"), "--out", str(out)],
        cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["ours"]) >= FIELDS and report["ours"]["steps"] == 2
    assert {"device", "git_commit", "versions", "date"} <= set(report["environment"])
    assert report["ours"]["peak"]["what"].startswith("CPU: measured")
    assert 0 < report["ours"]["padding_fraction"] < 1 and report["ours"]["tflops"] > 0
    if command == "compare":
        assert set(report["baseline"]) >= FIELDS
        assert report["speedup_samples_per_s"] == pytest.approx(
            report["ours"]["samples_per_s"] / report["baseline"]["samples_per_s"])
        # The baseline pads text and regions separately: never less padding than the compact layout.
        assert report["baseline"]["padding_fraction"] >= report["ours"]["padding_fraction"]
