"""Attention analysis: the maps are the model's attention, and the classifier's rule labels maps built
to have each of the paper's six patterns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from uniter_ds.analysis.attention import PATTERNS, analyse, attention_maps, classify, pattern_scores
from uniter_ds.bench.baseline import BaselineUniter
from uniter_ds.data import synth_dataset
from uniter_ds.model import UniterForPretraining

from .helpers import collate, random_sample
from .launcher import ROOT, cpu_env

TEXT, REGIONS = 10, 30


def built_map(pattern: str, seed: int = 0) -> torch.Tensor:
    n = TEXT + REGIONS
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, n, generator=g) * 0.02
    attention = torch.zeros(n, n)
    is_text = torch.arange(n) < TEXT
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 1
    if pattern == "vertical":
        attention[:, 0] = attention[:, TEXT - 1] = 0.4
    elif pattern == "diagonal":
        attention[band] = 1.0
    elif pattern == "vertical+diagonal":
        attention[band] = 0.5
        attention[:, 0] += 0.5
        attention[:, TEXT - 1] += 0.5
    elif pattern == "block":
        attention[is_text[:, None] == is_text[None, :]] = 1.0
    elif pattern == "reversed-block":
        attention[is_text[:, None] != is_text[None, :]] = 1.0
    elif pattern == "heterogeneous":
        attention = -torch.log(torch.rand(n, n, generator=g))  # dense, no structure (Dirichlet rows)
    attention = attention + noise
    return attention / attention.sum(-1, keepdim=True)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classifier_labels_built_maps(pattern, seed):
    assert classify(pattern_scores(built_map(pattern, seed), TEXT)) == pattern


def test_uniform_attention_is_heterogeneous_whatever_the_modality_sizes():
    for text, regions in [(12, 36), (5, 95), (40, 10)]:
        n = text + regions
        scores = pattern_scores(torch.full((n, n), 1 / n), text)
        assert scores["within_modality"] == pytest.approx(0.5)
        assert classify(scores) == "heterogeneous"
    with pytest.raises(ValueError, match="num_text"):
        pattern_scores(torch.full((5, 5), 0.2), 5)  # no regions


def test_analysis_counts_every_head():
    maps = [torch.stack([torch.stack([built_map(p, s) for p in ("vertical", "block")])]) for s in range(3)]
    analysis = analyse(maps, [TEXT] * 3)
    assert [h["pattern"] for h in analysis["heads_by_layer"][0]] == ["vertical", "block"]
    assert analysis["pattern_counts_by_layer"][0]["vertical"] == 1 and analysis["pattern_share"]["block"] == 0.5


def test_maps_are_the_models_attention(tiny_config):
    """Against transformers' eager BERT attention (output_attentions) over the same sequence and
    weights; a sample's maps do not depend on the other samples of its batch."""
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    g = torch.Generator().manual_seed(3)
    samples = [random_sample(tiny_config, t, r, g) for t, r in [(7, 9), (12, 4), (5, 11)]]
    together = attention_maps(model.uniter, collate(samples))
    alone = attention_maps(model.uniter, collate(samples[:1]))[0]
    torch.testing.assert_close(together[0], alone, atol=1e-5, rtol=1e-4)
    for maps in together:
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)

    baseline = BaselineUniter.from_uniter(model).eval()
    batch = collate(samples[:1])
    with torch.no_grad():
        text = baseline.bert.embeddings(input_ids=batch.input_ids, token_type_ids=torch.zeros_like(batch.input_ids))
        image_type = baseline.bert.embeddings.token_type_embeddings(torch.ones(1, 1, dtype=torch.long))
        regions = baseline.img_embeddings(batch.img_feat, batch.img_pos, image_type, batch.img_masks)
        reference = []  # eager BertSelfAttention returns (context, attention probabilities)
        hooks = [layer.attention.self.register_forward_hook(lambda m, i, out: reference.append(out[1][0]))
                 for layer in baseline.bert.encoder.layer]
        baseline.bert.encoder(torch.cat([text, regions], 1))
        for hook in hooks:
            hook.remove()
    assert len(reference) == tiny_config.num_hidden_layers
    torch.testing.assert_close(alone, torch.stack(reference), atol=1e-5, rtol=1e-4)


def test_attention_command_writes_maps_histogram_and_json(tmp_path, tiny_config):
    torch.manual_seed(0)
    UniterForPretraining(tiny_config).save_pretrained(tmp_path / "model")
    synth_dataset(tmp_path / "data", images=6, img_dim=tiny_config.img_dim, img_label_dim=tiny_config.img_label_dim,
                  num_classes=8, max_regions=12)
    result = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "attention", str(tmp_path / "model"), "--data",
                             str(tmp_path / "data"), "--samples", "4", "--out", str(tmp_path / "out")],
                            cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "attention.json").read_text())
    layers, heads = tiny_config.num_hidden_layers, tiny_config.num_attention_heads
    assert report["samples"] == 4 and (report["layers"], report["heads"]) == (layers, heads)
    assert all(h["pattern"] in PATTERNS for row in report["heads_by_layer"] for h in row)
    assert sum(sum(row.values()) for row in report["pattern_counts_by_layer"]) == layers * heads
    for name in ("attention_maps.png", "attention_patterns.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    wrong = subprocess.run([sys.executable, "-m", "uniter_ds.cli", "attention", str(tmp_path / "model"), "--data",
                            str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")],
                           cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "nowhere" in wrong.stderr
