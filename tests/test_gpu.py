"""On a CUDA GPU: DeepSpeed steps in every precision and ZeRO stage against an fp32 reference, a step
free of host syncs for every task, torch.compile and activation checkpointing against eager, the
attention backend that runs. Skipped without CUDA (``-m gpu`` selects these alone).

Tolerances (relative difference of the loss of a step, same batches, same initial weights, no
dropout): bf16 2e-2, fp16 5e-3 (bf16 keeps 8 bits of mantissa, fp16 11); compile vs eager in fp32
1e-4 (kernels fuse differently, nothing else may change).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from uniter_ds.model import UniterConfig, UniterForPretraining
from uniter_ds.model.acceleration import compile_for_training, use_cuda_graphs
from uniter_ds.model.inputs import UniterBatch

from .helpers import collate, random_sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TASKS = ("mlm", "itm", "mrfr", "mrc", "mrc-kl")
STEPS = 3


def small_config() -> UniterConfig:
    # Large enough for tensor-core shapes, small enough to build 10 engines in seconds.
    return UniterConfig.from_preset("tiny", hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                                    num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batches(config: UniterConfig, seed: int = 0) -> list[tuple[str, UniterBatch]]:
    """One batch per task (pinned, on the host, as the loader hands them over)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, task in enumerate(TASKS):
        lengths = [(9 + i, 17), (14, 40 - i), (6, 25)]
        samples = [random_sample(config, t, r, generator) for t, r in lengths]
        batch = collate(samples, itm_targets=[1, 0, 1])
        out.append((task, batch.pin_memory() if torch.cuda.is_available() else batch))
    return out


@pytest.fixture(scope="module")
def device() -> torch.device:
    from uniter_ds.train.distributed import init_distributed

    return init_distributed()[2]


def engine_for(model: torch.nn.Module, zero: int, precision: str, accumulation: int = 1, **zero_options):
    import deepspeed

    from uniter_ds.bench.throughput import BenchSettings, bench_deepspeed_config
    from uniter_ds.train.engine import param_groups

    ds_config, _ = bench_deepspeed_config(BenchSettings(zero_stage=zero, precision=precision,
                                                        accumulation=accumulation), on_gpu=True)
    ds_config["zero_optimization"] |= zero_options
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds_config)
    return engine


def run_steps(engine, data: list[tuple[str, UniterBatch]], device: torch.device, steps: int = STEPS,
              read_losses: bool = True) -> list[float]:
    """``steps`` training steps over ``data`` in turn; each step's loss (read on the host, so not
    with ``read_losses=False``, which leaves the step as training runs it)."""
    from uniter_ds.train.scheduler import Stream
    from uniter_ds.train.step import new_window, train_step

    names = [f"test/{task}" for task in TASKS]
    window = new_window(names, device)
    losses = []
    for step in range(steps):
        task, batch = data[step % len(data)]
        train_step(engine, [batch], [Stream("test", task)], device, device, window, names)
        if read_losses:
            index = names.index(f"test/{task}")
            losses.append(float(window["loss"][index] / window["items"][index]))
            for value in window.values():
                value.zero_()
    return losses


@pytest.fixture(scope="module")
def reference(device):
    config = small_config()
    torch.manual_seed(0)
    model = UniterForPretraining(config)
    initial = copy.deepcopy(model.state_dict())
    losses = run_steps(engine_for(model, 0, "fp32"), batches(config), device)
    return config, initial, losses


@pytest.mark.parametrize(("zero", "precision"), [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (2, "fp16")])
def test_deepspeed_step_matches_fp32(reference, device, zero, precision):
    config, initial, expected = reference
    model = UniterForPretraining(config)
    model.load_state_dict(initial)
    engine = engine_for(model, zero, precision)
    losses = run_steps(engine, batches(config), device)
    tolerance = 2e-2 if precision == "bf16" else 5e-3
    for step, (got, want) in enumerate(zip(losses, expected)):
        assert abs(got - want) <= tolerance * abs(want), f"step {step}: {got} vs fp32 {want} (ZeRO-{zero} {precision})"
    if precision == "bf16":
        assert engine.skipped_steps == 0, "a bf16 step was skipped"
    else:  # the dynamic loss scale starts at 2^16 and halves on each overflow until the gradients fit
        assert engine.skipped_steps < STEPS, "fp16: every step overflowed"


# Host synchronisations DeepSpeed itself makes in a ZeRO-1/2 bf16 step with gradient clipping
# (deepspeed 0.19.8; found by benchmarks/gpu_syncs.py on an H200): the grad-norm sentinel
# (mask_nan_or_inf_with_val_inplace builds a scalar tensor from a Python float) and the clip's
# validity check (is_invalid_grad_norm calls bool() on a device tensor). bf16's per-step overflow
# check is off in ds_configs/ (check_grad_overflow: false). Everything else must not wait.
DEEPSPEED_SYNCS_PER_STEP = 6


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_training_step_never_waits_for_the_host(device, task, layout):
    """forward, backward and optimizer step of every task under the production ZeRO-2 bf16 config,
    with CUDA's sync debug mode reporting each host synchronisation and where it came from: none from
    our code, and no more than the known ones inside DeepSpeed's gradient clipping. Packed: rows with
    the nested (jagged) attention, whose sequence bounds are given, not read back."""
    from uniter_ds.bench.syncs import recorded_syncs

    config = small_config()
    torch.manual_seed(0)
    engine = engine_for(UniterForPretraining(config), 2, "bf16")
    data = [(t, b) for t, b in (batches(config) if layout == "padded" else packed_batches(config)) if t == task]
    run_steps(engine, data, device, steps=1)  # first step: allocations, lazy initialisation
    torch.cuda.synchronize()
    with recorded_syncs() as frames:
        run_steps(engine, data, device, steps=len(data), read_losses=False)
    sites = [f"{frame.filename}:{frame.lineno}" for frame in frames]
    ours = [site for site in sites if "/deepspeed/" not in site]
    assert not ours, f"host synchronisations in our step: {ours}"
    assert len(sites) <= DEEPSPEED_SYNCS_PER_STEP, f"DeepSpeed now synchronises more often: {sites}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layers_match_eager(device, dtype, monkeypatch):
    # The ZeRO-3 tests above left DeepSpeed's linear in torch.nn.functional (memory_efficient_linear,
    # DeepSpeed's default), which torch 2.11 compiles wrong and our forward refuses there
    # (test_kernels_and_cli.py): these are the layers as ZeRO-0/1/2 compile them.
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    config = small_config()
    torch.manual_seed(0)
    eager = UniterForPretraining(config).to(device)
    compiled = copy.deepcopy(eager)
    compiled.uniter.encoder.compile_layers()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for task, batch in batches(config)[:2] + batches(config, seed=1)[:2]:  # two shapes per task
        batch = batch.to(device)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            want, got = eager(batch, task).loss, compiled(batch, task).loss
        want.backward()
        got.backward()
        assert abs(float(got) - float(want)) <= tolerance * abs(float(want)), (task, float(got), float(want))
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            scale = a.grad.abs().max().clamp(min=1e-6)
            assert (a.grad - b.grad).abs().max() / scale < tolerance * 5, name


@pytest.mark.parametrize("zero", [2, 3])
def test_compiled_deepspeed_steps_match_fp32(reference, device, zero, monkeypatch):
    """``model.compile`` as training runs it (layers and IPOT) trains under DeepSpeed bf16 with the fp32
    eager run's losses (the gradients themselves: test_compiled_layers_match_eager); ZeRO-3 with
    memory_efficient_linear off, as torch 2.11 needs (pytorch/pytorch#180642)."""
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)  # undo earlier ZeRO-3 engines
    config, initial, expected = reference
    model = UniterForPretraining(config)
    model.load_state_dict(initial)
    compile_for_training(model)
    options = {"memory_efficient_linear": False} if zero == 3 else {}
    losses = run_steps(engine_for(model, zero, "bf16", **options), batches(config), device)
    for step, (got, want) in enumerate(zip(losses, expected)):
        assert abs(got - want) <= 2e-2 * abs(want), f"step {step}: compiled {got} vs eager fp32 {want} (ZeRO-{zero})"


def test_activation_checkpointing_with_zero3(reference, device):
    config, initial, expected = reference
    model = UniterForPretraining(config)
    model.load_state_dict(initial)
    model.uniter.encoder.activation_checkpointing = True
    losses = run_steps(engine_for(model, 3, "bf16"), batches(config), device)
    for got, want in zip(losses, expected):
        assert abs(got - want) <= 2e-2 * abs(want)


def test_attention_backend_that_runs(device):
    from uniter_ds.model.kernels import attention_backend

    config = UniterConfig.from_preset("large")
    ran = attention_backend(config.num_attention_heads, config.head_dim, 0.1, device, torch.bfloat16)
    assert ran in ("efficient", "cudnn"), f"training attention fell back to {ran}"
    assert attention_backend(config.num_attention_heads, config.head_dim, 0.0, device, torch.bfloat16) != "math"
    with pytest.raises(ValueError, match="'flash' cannot run"):
        attention_backend(config.num_attention_heads, config.head_dim, 0.1, device, torch.bfloat16, "flash")


def test_each_rank_gets_its_local_gpu(monkeypatch):
    from uniter_ds.train.distributed import rank_device

    for index in range(torch.cuda.device_count()):
        monkeypatch.setenv("LOCAL_RANK", str(index))
        assert rank_device() == torch.device(f"cuda:{index}")
        assert torch.cuda.current_device() == index
    monkeypatch.setenv("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(0)


def packed_batches(config: UniterConfig, rows: int = 3, row_len: int = 128, seed: int = 0
                   ) -> list[tuple[str, UniterBatch]]:
    """Two batches per task in the packed layout, all [rows, row_len]: the row-filling batcher's one shape."""
    from uniter_ds.model.inputs import pack

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, task in enumerate(TASKS * 2):
        lengths = [(9 + i, 17), (14, 40 - i), (6, 25 + i), (12, 30)]
        batch = collate([random_sample(config, t, r, generator) for t, r in lengths], itm_targets=[1, 0, 1, 0])
        out.append((task, pack(batch, row_len, num_rows=rows).pin_memory()))
    return out


def test_cuda_graphs_accumulate_the_eager_gradients(device):
    """Two micro-batches' gradients summed in .grad, graphed vs eager (fp32, no dropout): equal. Without
    the copy out of the graph's static gradient buffers, the second replay overwrites the first's
    gradients before they are added (pytorch/pytorch#181723)."""
    config = small_config()
    data = packed_batches(config)
    torch.manual_seed(0)
    eager = UniterForPretraining(config).to(device).train()
    eager.uniter.encoder.packed_attention = "mask"  # the one-shape form graphs replay
    graphed = copy.deepcopy(eager)
    use_cuda_graphs(graphed.uniter.encoder)
    for model in (eager, graphed):
        for first, second in [(data[0], data[1]), (data[2], data[3]), (data[4], data[5])]:  # replays after one capture
            model.zero_grad(set_to_none=True)
            for task, batch in (first, second):
                model(batch.to(device, non_blocking=True), task).loss.backward()
    assert len(graphed.uniter.encoder.graphs.captured) == 1
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cuda_graphs_take_the_eager_deepspeed_steps(device):
    """ZeRO-2 bf16, 2 micro-batches per step, 5 steps: the losses of eager steps, one shape captured."""
    from uniter_ds.train.scheduler import Stream
    from uniter_ds.train.step import new_window, train_step

    config = small_config()
    data = packed_batches(config)
    torch.manual_seed(0)
    initial = UniterForPretraining(config).state_dict()
    names = [f"test/{task}" for task in TASKS]
    losses = {}
    for graphs in (False, True):
        model = UniterForPretraining(config)
        model.load_state_dict(initial)
        model.uniter.encoder.packed_attention = "mask"
        if graphs:
            use_cuda_graphs(model.uniter.encoder)
        engine = engine_for(model, 2, "bf16", accumulation=2)
        window = new_window(names, device)
        losses[graphs] = []
        for step in range(5):
            micro = [data[(2 * step) % len(data)], data[(2 * step + 1) % len(data)]]
            train_step(engine, [batch for _, batch in micro], [Stream("test", task) for task, _ in micro], device,
                       device, window, names)
            losses[graphs].append((window["loss"] / window["items"].clamp(min=1)).tolist())
            for value in window.values():
                value.zero_()
        if graphs:
            assert len(model.uniter.encoder.graphs.captured) == 1
    for step, (eager, graphed) in enumerate(zip(losses[False], losses[True])):
        assert graphed == pytest.approx(eager, rel=1e-3, abs=1e-4), f"step {step}"
