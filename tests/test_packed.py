"""The packed layout (issue 15): samples packed into fixed-length rows with a block-diagonal attention
give the padded layout's outputs, losses, gradients and optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch

from uniter_ds.model import TASKS, UniterForPretraining
from uniter_ds.model.acceleration import compile_for_training, use_cuda_graphs
from uniter_ds.model.inputs import pack_plan

from .helpers import collate, graphed_on_the_cpu, random_sample


def test_pack_plan_fills_rows_without_splitting_a_sample():
    lengths = [30, 7, 12, 25, 5, 18, 9]
    pack_index, segments, unpack_index = pack_plan(lengths, seq_len=30, row_len=32)
    assert pack_index.shape[1] == 32 and pack_index.shape[0] == 4  # 106 tokens: 4 rows of 32 at best
    for sample, length in enumerate(lengths):
        rows, slots = (segments == sample).nonzero(as_tuple=True)
        assert len(rows) == length and rows.unique().numel() == 1  # one row, contiguous
        assert (slots == slots[0] + torch.arange(length)).all()
        # Packing then unpacking is the identity on the sample's real positions.
        flat = unpack_index[sample, :length]
        assert (pack_index.reshape(-1)[flat] == sample * 30 + torch.arange(length)).all()
    assert int((segments >= 0).sum()) == sum(lengths)
    with pytest.raises(ValueError, match="pack_row_len 16 is shorter than a sample of 30 tokens"):
        pack_plan(lengths, seq_len=30, row_len=16)


def test_the_nested_attention_sequences_are_the_samples_and_the_row_tails():
    from uniter_ds.model.inputs import UniterBatch, pack

    lengths = torch.tensor([5, 9, 3, 7])
    batch = UniterBatch(input_ids=torch.zeros(4, 1), txt_lens=lengths, img_feat=torch.zeros(4, 1, 1),
                        img_pos=torch.zeros(4, 1, 1), img_lens=torch.zeros(4, dtype=torch.long),
                        gather_index=torch.zeros(4, 9), attn_mask=torch.ones(4, 9, dtype=torch.bool))
    pack(batch, 10, rows=[0, 1, 0, 2], num_rows=4)  # rows: [5, 3, pad 2], [9, pad 1], [7, pad 3], [pad 10]
    assert batch.pack_offsets.tolist() == [0, 5, 8, 10, 19, 20, 27, 30, 40]


def test_length_buckets_gather_each_sample_whole_and_scatter_it_back():
    from uniter_ds.model.attention import BUCKET_TOKENS, length_buckets

    lengths = [5, 40, 3, 33, 70]
    rows, row_len = [0, 1, 0, 2, 3], 80
    _, _, unpack_index = pack_plan(lengths, seq_len=70, row_len=row_len, rows=rows, num_rows=4)
    buckets = length_buckets(unpack_index, lengths, 4 * row_len)
    assert [tuple(g.shape) for g in buckets.gathers] == [(2, 32), (2, 64), (1, 70)]  # 70: the longest, not 96
    assert BUCKET_TOKENS == 32
    outputs = torch.cat([g.flatten() for g in buckets.gathers])  # what each bucket position holds
    real = torch.cat([m.flatten() for m in buckets.key_masks])
    slots = torch.zeros(4 * row_len, dtype=torch.bool)
    for sample, length in enumerate(lengths):
        slots[unpack_index[sample, :length]] = True
    # Every slot of a sample reads back its own token; positions past a sample's end are masked keys.
    assert torch.equal(outputs[buckets.scatter][slots], torch.arange(4 * row_len)[slots])
    assert torch.equal(real[buckets.scatter][slots], torch.ones(int(slots.sum()), dtype=torch.bool))
    assert int(real.sum()) == sum(lengths)


def _samples(config, seed: int, count: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(4, 14, (1,), generator=g)), int(torch.randint(2, 20, (1,), generator=g)))
             for _ in range(count)]
    return [random_sample(config, t, r, g) for t, r in sizes]


@pytest.mark.parametrize("attention", ["nested", "mask", "buckets"])
@pytest.mark.parametrize("task", TASKS)
def test_packed_layout_gives_the_padded_losses_and_gradients(tiny_config, task, attention):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).train()  # dropout 0 in the tiny test config
    model.uniter.encoder.packed_attention = attention
    samples = _samples(tiny_config, 1)
    itm = [1, 0, 1, 1, 0, 1, 0]
    padded, packed = collate(samples, itm), collate(samples, itm, pack_row_len=40)
    assert packed.pack_index.shape[0] < packed.batch_size  # several samples share rows
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        out = model(batch, task)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        encoded = model.uniter(batch)
        results.append((out, grads, encoded))
    (a, grads_a, enc_a), (b, grads_b, enc_b) = results
    torch.testing.assert_close(b.item_losses, a.item_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)
    mask = padded.attn_mask.unsqueeze(-1)
    torch.testing.assert_close(enc_b.sequence_output * mask, enc_a.sequence_output * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc_b.pooled_output, enc_a.pooled_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("attention", ["nested", "mask", "buckets"])
def test_packed_layout_takes_the_padded_optimizer_steps(tiny_config, attention, compiled):
    """The packed model, eager or compiled (layers and IPOT, as model.compile trains), takes the eager
    padded model's AdamW steps."""
    torch.manual_seed(0)
    padded_model = UniterForPretraining(tiny_config).train()
    packed_model = copy.deepcopy(padded_model)
    packed_model.uniter.encoder.packed_attention = attention
    if compiled:
        compile_for_training(packed_model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (padded_model, packed_model)]
    for step, task in enumerate(["mlm", "itm", "mrc-kl", "mrfr"]):
        samples = _samples(tiny_config, 10 + step)
        itm = [step % 2, 1, 0, 1, 1, 0, 1]
        for model, optimizer, row_len in zip((padded_model, packed_model), optimizers, (None, 36)):
            optimizer.zero_grad()
            model(collate(samples, itm, pack_row_len=row_len), task).loss.backward()
            optimizer.step()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


def test_pretraining_with_the_packed_layout_takes_the_padded_steps(tmp_path):
    """``data.layout: packed`` through the real job (launcher, loader workers, DeepSpeed): every step's
    losses as with ``padded`` (dropout off, so that both draw nothing). With ``data.batching: rows`` the
    batches differ (that batcher's own tests are above); here: the job runs it, with less padding."""
    import json

    import yaml

    from uniter_ds.data import synth_dataset

    from .launcher import ROOT, free_port, run_launcher

    synth_dataset(tmp_path / "data", images=80, seed=0, img_dim=64, img_label_dim=41, min_regions=5, max_regions=40,
                  max_shard_bytes=60_000)
    metrics = {}
    for layout in ("padded", "packed", "rows"):
        config = {
            "run_dir": str(tmp_path / layout), "seed": 1, "deepspeed_config": str(ROOT / "ds_configs" / "cpu.json"),
            "model": {"preset": "tiny", "overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
            "data": {"train": [{"name": "s", "paths": [str(tmp_path / "data")],
                                "tasks": {"mlm": 2, "itm": 1, "mrfr": 1, "mrc-kl": 1}}],
                     "token_budget": 800, "num_workers": 1, "shuffle_buffer": 20,
                     "layout": "padded" if layout == "padded" else "packed",
                     "batching": "rows" if layout == "rows" else "budget", "pack_row_len": 128,
                     "pool_budgets": 4, "min_pool_tokens": 3200},
            "optim": {"lr": 1e-3, "warmup_steps": 1, "total_steps": 6},
            "eval": {"every": 0, "at_end": False}, "checkpoint": {"every": 0, "at_end": False},
            "tracking": {"mlflow": False, "log_every": 1},
        }
        path = tmp_path / f"{layout}.yaml"
        path.write_text(yaml.safe_dump(config))
        run_launcher(["--num_gpus", "1", "--master_port", str(free_port()), "--module", "uniter_ds.train.pretrain",
                      "--config", str(path)])
        metrics[layout] = [json.loads(line) for line in (tmp_path / layout / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics["packed"]] == list(range(1, 7))
    # The encoder really ran other shapes: rows of 128 pad otherwise than [samples, longest].
    assert [row["padding_fraction"] for row in metrics["packed"]] != [row["padding_fraction"]
                                                                      for row in metrics["padded"]]
    for padded, packed in zip(metrics["padded"], metrics["packed"]):
        losses = [k for k in padded if k.startswith("train/") and k.endswith("/loss")]
        assert losses
        for key in losses:
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), (padded["step"], key)
    assert [row["step"] for row in metrics["rows"]] == list(range(1, 7))
    padding = {layout: sum(row["padding_fraction"] for row in rows) / len(rows) for layout, rows in metrics.items()}
    assert padding["rows"] < min(padding["packed"], 0.1), padding


def test_the_loader_packs_the_same_samples_into_rows_of_the_given_length(tmp_path):
    """The same samples, masks and tokens as the padded layout, in [rows, pack_row_len]. (Not fewer padded
    tokens: the budget batcher groups samples of similar length, which pads 1-5% in the compact layout,
    and such groups fill fixed-length rows worse; filling rows from mixed lengths is the batcher's job.)"""
    from uniter_ds.data import LoaderConfig, StreamDataset, synth_dataset

    synth_dataset(tmp_path / "data", images=60, seed=0, img_dim=16, img_label_dim=41, min_regions=5, max_regions=60,
                  max_shard_bytes=40_000)
    seen = {}
    for row_len in (None, 96):
        stream = StreamDataset([tmp_path / "data"], "mrc", LoaderConfig(num_workers=0, token_budget=1200,
                                                                     shuffle_buffer=20, pack_row_len=row_len or 256,
                                                                     layout="packed" if row_len else "padded"))
        batches = [b for _, b in zip(range(6), stream)]
        seen[row_len] = [(b.meta["pairs"], b.img_masks.tolist(), b.real_tokens()) for b in batches]
        if row_len:
            for batch in batches:
                rows = batch.pack_index.shape[0]
                assert batch.pack_index.shape[1] == row_len and batch.padded_tokens() == rows * row_len
                assert batch.meta["padded_tokens"] == rows * row_len
                assert int((batch.pack_segments >= 0).sum()) == batch.real_tokens()
    assert seen[96] == seen[None]


def test_best_fit_rows_packs_tightly_and_keeps_every_sample():
    import random

    from uniter_ds.model.inputs import best_fit_rows

    lengths = [random.Random(seed).randint(12, 160) for seed in range(2000)]
    rows = best_fit_rows(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 256 and fills == sorted(fills, reverse=True)
    assert sum(lengths) / (256 * len(rows)) > 0.97  # first-fit over length-sorted batches managed 0.78
    with pytest.raises(ValueError, match="raise data.pack_row_len"):
        best_fit_rows([100, 300], 256)


def test_the_row_filling_batcher_sends_full_rows_of_one_shape_and_every_sample_once(tmp_path):
    from uniter_ds.data import DataError, LoaderConfig, StreamDataset, synth_dataset

    synth_dataset(tmp_path / "data", images=150, seed=1, img_dim=16, img_label_dim=41, min_regions=5, max_regions=60,
                  max_shard_bytes=40_000)
    common = {"num_workers": 0, "token_budget": 960, "shuffle_buffer": 20, "pool_budgets": 4, "min_pool_tokens": 4000,
              "split": "exact"}
    budget = list(StreamDataset([tmp_path / "data"], "mrc", LoaderConfig(**common)))
    packed = {"layout": "packed", "batching": "rows"}
    rows = list(StreamDataset([tmp_path / "data"], "mrc", LoaderConfig(**common, **packed, pack_row_len=96)))
    pairs = sorted(pair for batch in budget for pair in batch.meta["pairs"])
    assert sorted(pair for batch in rows for pair in batch.meta["pairs"]) == pairs  # the epoch, each pair once
    for batch in rows:
        assert tuple(batch.pack_index.shape) == (10, 96)  # the last batch too (padded with empty rows)
        assert int((batch.pack_segments >= 0).sum()) == batch.real_tokens() == batch.meta["real_tokens"]
        for sample in range(len(batch.meta["pairs"])):  # each sample whole in one row, positions in order
            slots = batch.unpack_index[sample, : batch.meta["lengths"][sample]]
            assert len(set((slots // 96).tolist())) == 1 and torch.equal(slots, slots[0] + torch.arange(len(slots)))
    padding = 1 - sum(b.real_tokens() for b in rows[:-1]) / sum(b.padded_tokens() for b in rows[:-1])
    assert padding < 0.05, padding
    with pytest.raises(DataError, match=r"more than a packed row holds: raise data.pack_row_len \(40\)"):
        list(StreamDataset([tmp_path / "data"], "mrc", LoaderConfig(**common, **packed, pack_row_len=40)))
    with pytest.raises(ValueError, match="batching"):
        LoaderConfig(batching="rows")  # rows of what length


def test_cuda_graphs_are_refused_where_they_cannot_run(tiny_config, monkeypatch):
    """Graphed training runs in tests/test_gpu.py (and on a CPU stand-in below); here, what refuses it
    (and nothing is hooked)."""
    encoder = UniterForPretraining(tiny_config).uniter.encoder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="need a CUDA GPU; none is visible"):
        use_cuda_graphs(encoder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    encoder.activation_checkpointing = True
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        use_cuda_graphs(encoder)
    encoder.activation_checkpointing = False
    for form in ("nested", "buckets"):
        encoder.packed_attention = form
        with pytest.raises(RuntimeError, match=f"the {form} attention's shapes change with every batch"):
            use_cuda_graphs(encoder)
    assert encoder.graphs is None and not any(p._backward_hooks for p in encoder.parameters())


@pytest.fixture
def graphs_on_the_cpu(monkeypatch):
    """The encoder's CUDA-graph path (capture per shape, gradient hooks) run on the CPU stand-in."""
    from uniter_ds.model.acceleration import CudaGraphedLayers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graphed_on_the_cpu)
    monkeypatch.setattr(CudaGraphedLayers, "device_type", "cpu")


def _rows(config, seed: int, num_rows: int = 6) -> tuple[str, object]:
    from uniter_ds.model.inputs import pack

    task = TASKS[seed % len(TASKS)]
    return task, pack(collate(_samples(config, seed, count=5), [1, 0, 1, 0, seed % 2]), 40, num_rows=num_rows)


def test_graphed_layers_accumulate_and_step_as_the_eager_ones(tiny_config, graphs_on_the_cpu):
    """Two micro-batches per AdamW step, three steps, every task: the graphed model's losses, summed
    gradients and weights are the eager model's. The graph's gradient buffers are overwritten by the
    next replay: without the copy out of them, .grad aliases a buffer and the second micro-batch's
    gradient counts twice (pytorch/pytorch#181723); tests/test_gpu.py runs the real graphs."""
    torch.manual_seed(0)
    eager = UniterForPretraining(tiny_config).train()
    eager.uniter.encoder.packed_attention = "mask"  # the one-shape form graphs replay
    graphed = copy.deepcopy(eager)
    use_cuda_graphs(graphed.uniter.encoder)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    for step in range(3):
        micro = [_rows(tiny_config, 20 + 2 * step), _rows(tiny_config, 21 + 2 * step)]
        losses = []
        for model, optimizer in zip((eager, graphed), optimizers):
            optimizer.zero_grad(set_to_none=True)
            losses.append([])
            for task, batch in micro:
                loss = model(batch, task).loss
                loss.backward()
                losses[-1].append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), f"step {step}"
        for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")
        for optimizer in optimizers:
            optimizer.step()
    assert len(graphed.uniter.encoder.graphs.captured) == 1  # one shape, captured once
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


GRAPHED_ENGINE = """
import copy, json, sys, torch, deepspeed
from uniter_ds.bench.throughput import BenchSettings, bench_deepspeed_config
from uniter_ds.model import TASKS, UniterConfig, UniterForPretraining
from uniter_ds.model.acceleration import CudaGraphedLayers, use_cuda_graphs
from uniter_ds.model.inputs import pack
from uniter_ds.train.distributed import init_distributed
from uniter_ds.train.engine import param_groups
from uniter_ds.train.step import new_window, train_step
from uniter_ds.train.scheduler import Stream
from tests.helpers import collate, graphed_on_the_cpu, random_sample

init_distributed()
config = UniterConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
g = torch.Generator().manual_seed(0)
data = []
for i in range(6):
    samples = [random_sample(config, 4 + (3 * i + k) % 10, 2 + (5 * i + k) % 18, g) for k in range(5)]
    data.append((TASKS[i % len(TASKS)], pack(collate(samples, [1, 0, 1, 0, i % 2]), 40, num_rows=6)))
torch.manual_seed(0)
initial = UniterForPretraining(config)
names = [f"test/{task}" for task in TASKS]
ds_config, _ = bench_deepspeed_config(BenchSettings(zero_stage=int(sys.argv[1]), precision="fp32",
                                                    accumulation=2), False)
ds_config["optimizer"]["params"]["lr"] = 1e-3  # steps that move the weights well past the tolerance
results = {}
for graphs in (False, True):
    model = copy.deepcopy(initial)
    model.uniter.encoder.packed_attention = "mask"
    if graphs:  # as pretraining does: before the engine exists
        torch.cuda.make_graphed_callables = graphed_on_the_cpu
        CudaGraphedLayers.device_type = "cpu"
        available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
        use_cuda_graphs(model.uniter.encoder)
        torch.cuda.is_available = available
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds_config)
    window = new_window(names, torch.device("cpu"))
    losses = []
    for step in range(3):
        micro = data[2 * step: 2 * step + 2]
        train_step(engine, [b for _, b in micro], [Stream("test", t) for t, _ in micro], torch.device("cpu"),
                   torch.device("cpu"), window, names)
        losses.append((window["loss"] / window["items"].clamp(min=1)).tolist())
        for value in window.values():
            value.zero_()
    results[graphs] = {"losses": losses, "captured": len(model.uniter.encoder.graphs.captured) if graphs else 0,
                       "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
weights, start = results[False]["weights"], initial.state_dict()
print(json.dumps({"losses": [results[False]["losses"], results[True]["losses"]],
                  "captured": results[True]["captured"],
                  "moved": max(float((w - start[n]).abs().max()) for n, w in weights.items()),
                  "differ": {n: float((results[True]["weights"][n] - w).abs().max()) for n, w in weights.items()}}))
"""


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_graphed_layers_take_the_eager_deepspeed_steps(zero):
    """A real DeepSpeed engine (two micro-batches per step) over the graphed layers of the CPU
    stand-in: three steps with the eager engine's losses and weights. ZeRO-0 accumulates in .grad (the
    aliasing case: it fails without the copy-out hook); ZeRO-1/2's hooks move each micro-batch's
    gradient into their own buffers."""
    import json
    import subprocess
    import sys

    from .launcher import ROOT, one_rank_env

    env = one_rank_env()
    result = subprocess.run([sys.executable, "-c", GRAPHED_ENGINE, str(zero)], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    eager, graphed = report["losses"]
    assert report["captured"] == 1 and report["moved"] > 1e-3  # one shape; the steps changed the weights
    for step, (a, b) in enumerate(zip(eager, graphed)):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), f"step {step}"
    assert max(report["differ"].values()) < 2e-5, sorted(report["differ"].items(), key=lambda kv: -kv[1])[:3]


def test_graphs_are_captured_for_a_few_shapes_then_the_layers_run_eagerly(tiny_config, graphs_on_the_cpu):
    from uniter_ds.model.acceleration import MAX_GRAPHED_SHAPES

    model = UniterForPretraining(tiny_config).train()
    model.uniter.encoder.packed_attention = "mask"
    use_cuda_graphs(model.uniter.encoder)
    reference = copy.deepcopy(model)
    reference.uniter.encoder.graphs = None
    shapes = range(6, 6 + MAX_GRAPHED_SHAPES + 2)
    with pytest.warns(UserWarning, match=f"{MAX_GRAPHED_SHAPES} input shapes captured already") as caught:
        for num_rows in [*shapes, *shapes]:  # each shape twice: a captured one replays, an eager one warns once
            task, batch = _rows(tiny_config, 3, num_rows)
            loss = model(batch, task).loss
            assert loss.item() == pytest.approx(reference(batch, task).loss.item(), rel=1e-5, abs=1e-6), num_rows
    assert len([w for w in caught if "captured already" in str(w.message)]) == 2  # shapes 5 and 6, once each
    assert len(model.uniter.encoder.graphs.captured) == MAX_GRAPHED_SHAPES
    model.uniter.encoder.graphs.captured.clear()
    with torch.no_grad():
        model(_rows(tiny_config, 3, 30)[1], "mlm")  # evaluation runs eagerly: nothing captured ...
    model.eval()
    model(_rows(tiny_config, 3, 30)[1], "mlm")  # ... nor in eval mode with gradients on
    assert not model.uniter.encoder.graphs.captured


def test_auto_packed_attention_is_nested_on_cuda_the_mask_under_graphs_and_buckets_on_cpu(tiny_config):
    encoder = UniterForPretraining(tiny_config).uniter.encoder
    assert encoder.packed_attention == "auto"
    on_cpu = torch.zeros(1)
    assert encoder.packed_attention_form(on_cpu) == "buckets"  # the fastest on CPU (benchmarks/RESULTS.md)
    on_cuda = type("CudaLike", (), {"is_cuda": True})()
    assert encoder.packed_attention_form(on_cuda) == "nested"
    encoder.graphs = object()  # graphs replay one shape: the dense mask
    assert encoder.packed_attention_form(on_cuda) == "mask"
    encoder.packed_attention = "nested"
    assert encoder.packed_attention_form(on_cpu) == "nested"
    model = UniterForPretraining(tiny_config)
    model.uniter.encoder.packed_attention = "Mask"  # set in code, past the config's check
    with pytest.raises(ValueError, match="packed_attention 'Mask': expected auto, nested, mask or buckets"):
        model(collate(_samples(tiny_config, 0), [1, 0, 1, 1, 0, 1, 0], pack_row_len=40), "mlm")
