"""Which training options combine: model/options.py decides, and the experiment config, the launcher and
the bench refuse the same combinations, naming their own key or flag."""

from __future__ import annotations

import pytest
import yaml

from uniter_ds.model import acceleration
from uniter_ds.model.options import ModelOptions, option_problems

GRAPHS = {"cuda_graphs": True, "packed_attention": "mask"}
ROWS = {"batching": "rows"}

# (what is set, what is known, the key named, what the reason says): each refused combination once.
REFUSED = [
    ({"cuda_graphs": True}, {"batching": "budget"}, "model.cuda_graphs", "needs one encoder shape per run"),
    (GRAPHS | {"packed_attention": "nested"}, ROWS, "model.cuda_graphs", "the nested attention's shapes change"),
    (GRAPHS | {"packed_attention": "buckets"}, ROWS, "model.cuda_graphs", "the buckets attention's shapes change"),
    (GRAPHS | {"activation_checkpointing": True}, ROWS, "model.cuda_graphs", "not with model.activation_checkpointing"),
    (GRAPHS | {"compile": True}, ROWS, "model.cuda_graphs", "not with model.compile"),
    (GRAPHS, ROWS | {"zero_optimization": {"stage": 3}}, "model.cuda_graphs", "not with ZeRO-3"),
    (GRAPHS, ROWS | {"cuda_available": False}, "model.cuda_graphs", "need a CUDA GPU"),
    ({"compile": True}, {"zero_optimization": {"stage": 3}}, "model.compile", "memory_efficient_linear"),
    ({"packed_attention": "flex"}, {}, "model.packed_attention", "'flex' is not one of"),
]


@pytest.fixture
def torch_2_11(monkeypatch):
    """The torch whose compile trains DeepSpeed's ZeRO-3 linear wrong (acceleration.py)."""
    monkeypatch.setattr(acceleration, "torch_version", lambda: acceleration.TORCH_WITH_INPLACE_FUNCTION_BUG)


@pytest.mark.parametrize("options,known,key,reason", REFUSED, ids=[f"{r[2]}:{r[3][:30]}" for r in REFUSED])
def test_each_refused_combination_is_named_once(options, known, key, reason, torch_2_11):
    problems = option_problems(ModelOptions(**options), **known)
    assert len(problems) == 1, problems
    assert problems[0][0] == key and reason in problems[0][1], problems


def test_what_combines_is_not_refused(torch_2_11):
    for options, known in [
        ({}, {"batching": "budget", "zero_optimization": {"stage": 3}, "cuda_available": False}),
        (GRAPHS, ROWS | {"zero_optimization": {"stage": 2}, "cuda_available": True}),
        ({"cuda_graphs": True, "packed_attention": "auto"}, ROWS),
        ({"compile": True, "activation_checkpointing": True, "packed_attention": "nested"},
         {"zero_optimization": {"stage": 3, "memory_efficient_linear": False}}),
        ({"compile": True}, {"zero_optimization": {"stage": 2}}),
    ]:
        assert option_problems(ModelOptions(**options), **known) == [], options


CONFIG_SETTINGS = {
    "model.cuda_graphs": {"model": {"cuda_graphs": True}},
    "model.packed_attention": {"model": {"packed_attention": "flex"}},
}


def test_the_config_and_the_bench_ask_the_same_rules(tmp_path):
    from uniter_ds.bench.throughput import BenchSettings
    from uniter_ds.train.config import ConfigError, load_config

    base = {"data": {"train": [{"name": "d", "paths": ["x"], "tasks": {"mlm": 1}}]}}
    for key, settings in CONFIG_SETTINGS.items():
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(base | settings))
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_config(path)
    with pytest.raises(ValueError, match="--cuda-graphs: needs one encoder shape per run"):
        BenchSettings(preset="tiny", cuda_graphs=True)
    with pytest.raises(ValueError, match="--cuda-graphs: not with model.activation_checkpointing"):
        BenchSettings(preset="tiny", cuda_graphs=True, activation_checkpointing=True, pack_row_len=256,
                      batching="rows", token_budget=1024)
