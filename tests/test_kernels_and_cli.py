"""Kernel selection and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from uniter_ds.model import UniterConfig, UniterForPretraining, UniterModel, active_kernels, kernels

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
    from uniter_ds.model.modeling import MIN_TORCH_FOR_COMPILE, torch_version

    torch.manual_seed(0)
    eager = UniterForPretraining(tiny_config).eval()
    compiled = UniterForPretraining(tiny_config).eval()
    compiled.load_state_dict(eager.state_dict())
    if torch_version() < MIN_TORCH_FOR_COMPILE:  # torch 2.11 gave wrong gradients here (an H200's CPU)
        with pytest.raises(RuntimeError, match="needs torch >="):
            compiled.uniter.encoder.compile_layers()
        return
    compiled.uniter.encoder.compile_layers()
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


def test_compile_is_refused_on_a_torch_that_trained_wrong(tiny_config, monkeypatch):
    from uniter_ds.model import modeling

    monkeypatch.setattr(modeling, "torch_version", lambda: (2, 11))
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.13 .*wrong gradients"):
        UniterModel(tiny_config).encoder.compile_layers()
    monkeypatch.setattr(modeling, "torch_version", lambda: (2, 13))
    UniterModel(tiny_config).encoder.compile_layers()  # accepted (compiles lazily, at the first call)
