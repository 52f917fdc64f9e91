"""Kernel selection and the command line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from uniter_ds.model import UniterConfig, UniterForPretraining, UniterModel, active_kernels, kernels
from uniter_ds.model.acceleration import compile_layers

from .helpers import collate, random_sample


def test_layer_norm_falls_back_to_torch_and_reports_it(tiny_config):
    model = UniterModel(tiny_config)
    if not torch.cuda.is_available():
        assert kernels.layer_norm(8, 1e-5).__class__ is nn.LayerNorm
    report = active_kernels(model)
    found = {type(m).__name__ for m in model.modules() if "LayerNorm" in type(m).__name__}
    assert all(name in report["layer_norm"] for name in found)
    assert "scaled_dot_product_attention" in report["attention"]


def test_fused_layer_norm_is_used_when_available(tiny_config, monkeypatch):
    class FusedLayerNorm(nn.LayerNorm):  # stands in for apex's, which needs CUDA
        pass

    monkeypatch.setattr(kernels, "_apex_fused_layer_norm", lambda: FusedLayerNorm)
    model = UniterModel(tiny_config)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(type(m) is FusedLayerNorm for m in norms)
    assert "FusedLayerNorm" in active_kernels(model)["layer_norm"]
    assert "LayerNorm.weight" in "".join(model.state_dict())  # names unchanged by the kernel choice


def test_kernel_choices_are_checked(monkeypatch):
    monkeypatch.setenv("UNITER_DS_LAYER_NORM", "fused")
    kernels._apex_fused_layer_norm.cache_clear()
    with pytest.raises(ValueError, match="UNITER_DS_LAYER_NORM='fused'"):
        kernels.layer_norm(8, 1e-5)
    if not torch.cuda.is_available():
        monkeypatch.setenv("UNITER_DS_LAYER_NORM", "apex")
        kernels._apex_fused_layer_norm.cache_clear()
        with pytest.raises(ValueError, match="needs apex installed and a CUDA device"):
            kernels.layer_norm(8, 1e-5)
    kernels._apex_fused_layer_norm.cache_clear()
    with pytest.raises(ValueError, match="SDPA backend 'fast'"), kernels.sdpa_backend("fast"):
        pass


def test_sdpa_backend_restriction_keeps_the_result(tiny_config):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    batch = collate([random_sample(tiny_config, t, r, torch.Generator().manual_seed(t)) for t, r in [(5, 7), (9, 3)]])
    with torch.no_grad():
        expected = model(batch, "mlm").loss
        with kernels.sdpa_backend("math"):
            assert torch.allclose(model(batch, "mlm").loss, expected, atol=1e-6)
    # CPU flash attention has no dropout: restricted to it, training with attention dropout cannot run.
    model = UniterForPretraining(UniterConfig.from_dict(tiny_config.to_dict() | {"attention_probs_dropout_prob": 0.1}))
    if not torch.cuda.is_available():
        with kernels.sdpa_backend("flash"), pytest.raises(RuntimeError, match="No available kernel"):
            model(batch, "mlm")


def test_compiled_encoder_matches_eager(tiny_config):
    """``model.compile: true`` / ``bench --compile``: same losses and gradients, names unchanged,
    and batches of another length reuse the dynamic graph."""
    torch.manual_seed(0)
    eager = UniterForPretraining(tiny_config).eval()
    compiled = UniterForPretraining(tiny_config).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_layers(compiled.uniter.encoder)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    for lengths in ([(5, 7), (9, 3)], [(12, 10), (4, 4), (6, 9)]):
        batch = collate([random_sample(tiny_config, t, r, g) for t, r in lengths])
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(batch, "mlm").loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (eager, compiled)]
    for task in ("mlm", "itm", "mlm"):  # a few optimizer steps: the weights stay together
        batch = collate([random_sample(tiny_config, t, r, g) for t, r in [(7, 5), (10, 8)]], itm_targets=[1, 0])
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            model(batch, task).loss.backward()
            optimizer.step()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


def test_model_info_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "model-info", "--preset", "large", "--json"],
                            capture_output=True, text=True, check=True)
    info = json.loads(result.stdout)
    assert info["config"]["num_hidden_layers"] == 24
    assert abs(info["parameters"]["transformer_and_pooler"] / 1e6 - 303) < 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 768, "num_layers": 12}))
    result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "model-info", "--config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown UniterConfig key(s) ['num_layers']" in result.stderr and str(bad) in result.stderr


def test_compile_through_deepspeeds_zero3_linear(tiny_config, monkeypatch):
    """DeepSpeed's ZeRO-3 makes ``torch.nn.functional.linear`` an autograd.Function that adds the bias
    in place, for the whole process; torch 2.11 compiles such a function with zero gradients
    (pytorch/pytorch#180642). Elsewhere the compiled layers give eager's gradients through it; on 2.11
    their forward refuses, naming the remedy."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from uniter_ds.model import acceleration

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    torch.manual_seed(0)
    eager = UniterForPretraining(tiny_config).eval()
    compiled = copy.deepcopy(eager)
    compile_layers(compiled.uniter.encoder)
    batch = collate([random_sample(tiny_config, t, r, torch.Generator().manual_seed(2)) for t, r in [(6, 5), (9, 7)]])
    if acceleration.torch_version() != acceleration.TORCH_WITH_INPLACE_FUNCTION_BUG:
        for model in (eager, compiled):
            model(batch, "mlm").loss.backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    monkeypatch.setattr(acceleration, "torch_version", lambda: acceleration.TORCH_WITH_INPLACE_FUNCTION_BUG)
    with pytest.raises(RuntimeError, match=r"DeepSpeed's ZeRO-3 linear.*#180642.*memory_efficient_linear"):
        compiled(batch, "mlm")
    eager(batch, "mlm")  # eager layers are not refused
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)  # memory_efficient_linear: false
    compiled(batch, "mlm")


ZERO3_ENGINE = """
import json, sys, torch, deepspeed
from uniter_ds.model import UniterConfig, UniterForPretraining
from uniter_ds.train.distributed import init_distributed
init_distributed()
zero = {"stage": 3} | json.loads(sys.argv[1])
model = UniterForPretraining(UniterConfig.from_preset("tiny"))
deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}})
linear = torch.nn.functional.linear
print("linear:", "torch's own" if linear is torch._C._nn.linear else linear.__module__)
"""


@pytest.mark.parametrize("options,linear", [({}, "deepspeed.runtime.zero.linear"),
                                            ({"memory_efficient_linear": False}, "torch's own")])
def test_a_zero3_engine_replaces_torch_linear_unless_told_not_to(tmp_path, options, linear):
    """What the refusal above rests on: a real ZeRO-3 engine puts DeepSpeed's linear in
    torch.nn.functional for the whole process by default, and leaves torch's with the key off."""
    from .launcher import one_rank_env

    env = one_rank_env()
    result = subprocess.run([sys.executable, "-c", ZERO3_ENGINE, json.dumps(options)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"linear: {linear}" in result.stdout, result.stdout[-2000:]


def test_deepspeed_configs_that_would_compile_wrong_are_refused(monkeypatch):
    from uniter_ds.bench.throughput import BenchSettings, bench_deepspeed_config
    from uniter_ds.model import acceleration

    monkeypatch.setattr(acceleration, "torch_version", lambda: acceleration.TORCH_WITH_INPLACE_FUNCTION_BUG)
    assert acceleration.zero3_compile_problem({"stage": 2}) is None
    assert acceleration.zero3_compile_problem({"stage": 3, "memory_efficient_linear": False}) is None
    assert "memory_efficient_linear" in acceleration.zero3_compile_problem({"stage": 3})
    with pytest.raises(ValueError, match=r"--compile with .*zero3_bf16\.json: .*memory_efficient_linear"):
        bench_deepspeed_config(BenchSettings(preset="tiny", zero_stage=3, precision="bf16", compile=True), False)
    bench_deepspeed_config(BenchSettings(preset="tiny", zero_stage=3, precision="bf16"), False)  # eager: fine
    monkeypatch.setattr(acceleration, "torch_version", lambda: (2, 12))
    assert acceleration.zero3_compile_problem({"stage": 3}) is None
    bench_deepspeed_config(BenchSettings(preset="tiny", zero_stage=3, precision="bf16", compile=True), False)
