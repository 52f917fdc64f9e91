"""Kernel selection and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from uniter_ds.model import UniterModel, active_kernels, kernels


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
