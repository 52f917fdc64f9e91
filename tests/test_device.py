"""Device placement: every rank takes the GPU its LOCAL_RANK names, before anything is built.

No GPU here: a stand-in accelerator records what the code asks of it. (tests/test_gpu.py checks
the same on real GPUs.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import uniter_ds
from uniter_ds.train import distributed


class FakeAccelerator:
    def __init__(self, count: int = 4):
        self.count = count
        self.calls: list[tuple] = []

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.calls.append(("set_device", index))

    def communication_backend_name(self):
        return "nccl"


@pytest.fixture
def fake(monkeypatch):
    accelerator = FakeAccelerator()
    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: accelerator)
    return accelerator


def test_rank_device_follows_local_rank(fake, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device() == torch.device("cuda:1")
    assert fake.calls == [("set_device", 1)]
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.rank_device() == torch.device("cuda:3")


def test_bad_local_rank_is_an_error(fake, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4, but this node has 4 cuda device"):
        distributed.rank_device()
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match="LOCAL_RANK='one'"):
        distributed.rank_device()


def test_init_distributed_selects_the_device_before_the_process_group(fake, monkeypatch):
    import deepspeed

    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: fake.calls.append(("init", dist_backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 6)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    assert distributed.init_distributed() == (6, 8, torch.device("cuda:2"))
    assert fake.calls == [("set_device", 2), ("init", "nccl")]


class Sentinel(Exception):
    pass


def test_entry_points_place_the_rank_before_building_anything(monkeypatch):
    """Pretraining (and with it evaluation, which runs on the device the run chose) and both bench
    systems call init_distributed first: nothing is built before the device is selected."""
    from uniter_ds.bench import throughput as bench
    from uniter_ds.train import pretrain

    built = []
    monkeypatch.setattr(pretrain, "build_model", lambda *a, **k: built.append("model"))
    monkeypatch.setattr(bench, "UniterForPretraining", lambda *a, **k: built.append("model"))

    def first(*args, **kwargs):
        raise Sentinel

    monkeypatch.setattr(pretrain, "init_distributed", first)
    monkeypatch.setattr(bench, "init_distributed", first)
    with pytest.raises(Sentinel):
        pretrain.run(object())  # the config is not even read before the device is chosen
    with pytest.raises(Sentinel):
        bench.bench_ours(bench.BenchSettings(preset="tiny"), [512], lambda *a: None)
    with pytest.raises(Sentinel):
        bench.bench_baseline(bench.BenchSettings(preset="tiny"), [512], lambda *a: None)
    assert not built


def test_no_module_reads_the_current_device():
    """`current_device_name()` / `torch.cuda.current_device()` read before a rank selects its GPU are
    cuda:0 on every rank: the package asks rank_device instead."""
    root = Path(uniter_ds.__file__).parent
    pattern = re.compile(r"current_device_name\(|cuda\.current_device\(|cuda:0")
    offenders = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders
