"""Ablation runner and its downstream probes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from uniter_ds.analysis.ablation import ARMS, Arm, markdown_table, summarize
from uniter_ds.analysis.probes import average_precision, extract, probe_pairs, train_linear
from uniter_ds.data import synth_dataset
from uniter_ds.data.synth import FUNCTION_WORDS, SPECIAL_TOKENS
from uniter_ds.model import UniterModel

from .launcher import ROOT, cpu_env, free_port


def test_linear_probe_learns_what_is_linearly_there_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    labels = torch.randint(0, 5, (600,), generator=g)
    x = centers[labels] + torch.randn(600, 16, generator=g)
    head, mean, std = train_linear(x[:400], labels[:400], "ce", steps=200)
    with torch.no_grad():
        accuracy = (head((x[400:] - mean) / std).argmax(-1) == labels[400:]).float().mean()
    assert accuracy > 0.95
    shuffled = labels[torch.randperm(600, generator=g)]  # no relation to x: held-out accuracy near chance
    head, mean, std = train_linear(x[:400], shuffled[:400], "ce", steps=200)
    with torch.no_grad():
        accuracy = (head((x[400:] - mean) / std).argmax(-1) == shuffled[400:]).float().mean()
    assert accuracy < 0.35


def test_average_precision_by_hand():
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    perfect = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [0.1, 0.2]])
    assert average_precision(perfect, labels) == pytest.approx(1.0)
    # Column 0 ranks rows 0, 3, 1, 2: its positives (rows 0 and 2) come 1st and 4th -> (1/1 + 2/4) / 2.
    # Column 1: its positive (row 1) comes 2nd -> 1/2. Column-mean: (0.75 + 0.5) / 2.
    scores = torch.tensor([[0.9, 0.9], [0.5, 0.8], [0.4, 0.3], [0.6, 0.2]])
    assert average_precision(scores, labels) == pytest.approx(0.625)


def test_probe_features_pair_each_caption_with_an_image_sharing_no_class(tmp_path, tiny_config):
    synth_dataset(tmp_path / "d", images=30, img_dim=tiny_config.img_dim, img_label_dim=tiny_config.img_label_dim,
                  num_classes=12, max_regions=15)
    pairs = probe_pairs(tmp_path / "d", 20)
    torch.manual_seed(0)
    features = extract(UniterModel(tiny_config), pairs, 12, batch_size=7)
    assert features.pooled.shape == features.pooled_mismatched.shape == (20, tiny_config.hidden_size)
    assert features.objects.sum(1).tolist() == [len(set(p.image.extra["classes"])) for p in pairs]
    first_object = len(SPECIAL_TOKENS) + len(FUNCTION_WORDS)
    object_words = [int(t) - first_object for p in pairs for t in p.input_ids if t >= first_object]
    assert len(features.grounding_hits) == len(object_words) > 0
    # Chance of each word: the share of its image's regions showing its object (captions name present ones).
    expected = [sum(c == w for c in p.image.extra["classes"]) / len(p.image.extra["classes"])
                for p in pairs for w in (int(t) - first_object for t in p.input_ids if t >= first_object)]
    torch.testing.assert_close(features.grounding_chance, torch.tensor(expected))
    assert (features.grounding_chance > 0).all()
    assert not torch.allclose(features.pooled, features.pooled_mismatched)


def test_summary_is_mean_and_spread_over_seeds():
    scores = [(0.5, 0.6, 0.7, 0.8), (0.7, 0.8, 0.9, 0.6)]
    rows = [{"arm": "itm", "seed": s, "held_out": {"val/itm/acc": a},
             "probes": {"objects": o, "match": m, "grounding": g, "meta_sum": 100 * (o + m + g)}}
            for s, (o, m, g, a) in enumerate(scores)]
    summary = summarize(rows, [Arm("itm", {"itm": 1}, paper_row="L4"), Arm("mlm", {"mlm": 1})])
    assert len(summary) == 1  # arms without rows are left out
    entry = summary[0]
    assert entry["objects"]["mean"] == pytest.approx(0.6) and entry["objects"]["std"] == pytest.approx(0.1414, 1e-3)
    assert entry["meta_sum"]["mean"] == pytest.approx(210.0) and entry["ITM acc"]["mean"] == pytest.approx(0.7)
    assert entry["MLM acc"] is None
    table = markdown_table({"summary": summary})
    assert "| itm | L4 | 0.600 ± 0.141 |" in table and "210.0 ± 42.4" in table  # Meta-Sums 180 and 240


def test_ablate_command_runs_pretraining_arms_and_probes_them(tmp_path):
    data = tmp_path / "data"
    for name, images, seed in (("train", 80, 0), ("val", 40, 1)):
        synth_dataset(data / name, images=images, img_dim=64, img_label_dim=41, num_classes=12, max_regions=15,
                      seed=seed, world_seed=0)
    config = tmp_path / "base.yaml"
    config.write_text((ROOT / "launch" / "ablation-tiny.yaml").read_text().replace(
        "data/synth-train", str(data / "train")).replace("data/synth-val", str(data / "val")))
    out = tmp_path / "ablation"
    command = [sys.executable, "-m", "uniter_ds.cli", "ablate", "--config", str(config), "--out", str(out),
               "--arms", "none", "itm", "--seeds", "3", "--steps", "4", "--num-gpus", "1",
               "--probe-train-images", "50", "--probe-test-images", "30", "--probe-steps", "30",
               "--set", "eval.batches=2", "--set", "eval.retrieval_images=10", "--set", "data.token_budget=512",
               "--set", "data.pool_budgets=4", "--set", "data.min_pool_tokens=2048"]
    env = cpu_env() | {"MASTER_PORT": str(free_port())}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert [(r["arm"], r["seed"]) for r in report["rows"]] == [("none", 3), ("itm", 3)]
    none, itm = report["rows"]
    assert none["held_out"] == {} and 0 <= itm["held_out"]["val/itm/acc"] <= 1
    assert json.loads((out / "itm" / "seed3" / "result.json").read_text())["last_step"] == 4
    for row in report["rows"]:
        assert set(row["probes"]) == {"objects", "match", "grounding", "meta_sum", "grounding_chance"}
        assert row["probes"]["meta_sum"] == pytest.approx(100 * sum(row["probes"][k] for k in
                                                                    ("objects", "match", "grounding")))
    assert "| none | L1 (no pretraining) |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([*command[:3], "ablate", "--config", str(config), "--out", str(out), "--arms", "mrm"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ['mrm']" in bad.stderr


def test_every_arm_has_a_distinct_setting():
    settings = [(tuple(sorted(a.tasks.items())), a.masking, a.wra_weight) for a in ARMS]
    assert len(set(settings)) == len(ARMS)
