"""Training throughput: our DeepSpeed engine vs the baseline.

Used by ``uniter-ds bench train|compare`` (and the ``memory`` search, whose probes are ``bench train``
runs). One measurement: warm-up steps (excluded), then several timed windows, the device synchronised
before every clock read; FLOPs from :mod:`uniter_ds.bench.flops` on real tokens (padding excluded).

Batches come from pre-built in-memory batches (model speed alone) or live from the shard reader with
DataLoader workers (model + input pipeline, as in pretraining). Under the ``deepspeed`` launcher every
rank measures its own steps and rank 0 gathers them into per-GPU and total numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import LoaderConfig, TaskStream, build_loader, synth_dataset
from ..model import UniterConfig, UniterForPretraining
from ..model.inputs import UniterBatch
from ..model.kernels import active_kernels, sdpa_backend
from .baseline import BaselineUniter
from .flops import training_flops

# Dense bf16/fp16 peaks (TFLOP/s) by device name, without sparsity; PERFORMANCE.md.
GPU_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0}


@dataclass
class BenchSettings:
    """One throughput measurement; the CLI flags of ``uniter-ds bench train`` map onto these fields."""

    preset: str = "base"
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 2
    token_budget: int = 4096  # text + regions incl. padding, per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step
    tasks: list[str] = field(default_factory=lambda: ["mlm", "itm", "mrfr", "mrc-kl"])
    source: str = "memory"  # memory: pre-built batches | shards: the live reader with DataLoader workers
    data: str | None = None  # a dataset folder; default: synthetic shards under data_dir
    data_dir: str | None = None
    workers: int = 2  # DataLoader workers per task (source=shards)
    batches: int = 4  # pre-built batches per task (source=memory)
    min_regions: int = 10
    max_regions: int = 100
    warmup: int = 3
    windows: int = 3
    steps: int = 4  # optimizer steps per timed window
    compile: bool = False  # torch.compile the encoder layers
    layer_norm: str = "auto"  # auto | torch | apex
    sdpa_backend: str = "auto"  # auto | math | flash | efficient | cudnn
    activation_checkpointing: bool = False
    profile_steps: int = 0  # extra steps under torch.profiler after the timed windows

    def __post_init__(self) -> None:
        checks = {"precision": self.precision in ("bf16", "fp16", "fp32"), "zero_stage": self.zero_stage in range(4),
                  "token_budget": self.token_budget > 0, "accumulation": self.accumulation >= 1,
                  "source": self.source in ("memory", "shards"), "layer_norm": self.layer_norm in ("auto", "torch",
                                                                                                     "apex"),
                  "warmup": self.warmup >= 0, "windows": self.windows >= 1, "steps": self.steps >= 1,
                  "batches": self.batches >= 1, "tasks": bool(self.tasks)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("bench settings: invalid " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))

    def model_config(self) -> UniterConfig:
        return UniterConfig.from_preset(self.preset, hidden_dropout_prob=0.1)


# ---------------------------------------------------------------------------------------------
# Devices, peaks, environment
# ---------------------------------------------------------------------------------------------


def device_peak(device: torch.device, precision: str = "fp32") -> tuple[float, str]:
    """(TFLOP/s, what it is): a datasheet table for GPUs; on CPU a measured matmul peak in the
    benchmark's precision (bf16 matmuls run ~2.7x faster than fp32 on this project's AVX512-BF16 CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name}: dense bf16/fp16 peak {peak} TFLOP/s (datasheet)"
        return float("nan"), f"{name}: no peak in the table"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n, repeats = 1024, 10
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):  # the best of 5 trials: a busy moment of the machine is not the peak
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    tflops = 2 * n**3 * repeats / best / 1e12
    return tflops, (f"CPU: measured {precision} {n}^3 matmul, {torch.get_num_threads()} threads "
                    f"({tflops:.3f} TFLOP/s)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict[str, Any]:
    import deepspeed
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": name, "device_type": device.type, "cpu_count": os.cpu_count(), "git_commit": commit,
            "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d")}


def _memory(device: torch.device) -> dict[str, float]:
    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def dataset_folder(settings: BenchSettings, config: UniterConfig) -> Path:
    """The user's dataset, or synthetic shards matching the model (written once, then reused)."""
    if settings.data:
        return Path(settings.data)
    root = Path(settings.data_dir or Path(tempfile.gettempdir()) / "uniter-ds-bench")
    folder = root / f"synth-{config.img_dim}-{config.img_label_dim}-{settings.min_regions}-{settings.max_regions}"
    if not (folder / "manifest.json").exists():
        images = max(400, settings.batches * settings.token_budget // 40)
        synth_dataset(folder, images=images, img_dim=config.img_dim, img_label_dim=config.img_label_dim,
                      min_regions=settings.min_regions, max_regions=settings.max_regions, min_captions=1,
                      max_captions=3, seed=0, num_classes=min(40, config.img_label_dim - 1),
                      max_shard_bytes=64 * 2**20)
    return folder


def make_batches(config: UniterConfig, tasks: list[str], token_budget: int, count: int, *,
                 min_regions: int = 10, max_regions: int = 100, seed: int = 0,
                 data_dir: str | Path | None = None, data: str | None = None) -> list[tuple[str, UniterBatch]]:
    """``count`` batches per task, kept in memory."""
    settings = BenchSettings(token_budget=token_budget, batches=count, min_regions=min_regions,
                             max_regions=max_regions, data_dir=str(data_dir) if data_dir else None, data=data)
    folder = dataset_folder(settings, config)
    out = []
    for task in tasks:
        stream = TaskStream([folder], task, LoaderConfig(token_budget=token_budget, split="resampled", seed=seed,
                                                         num_workers=0, max_text_len=None))
        iterator = iter(stream)
        out += [(task, next(iterator)) for _ in range(count)]
    return out


def step_batches(settings: BenchSettings, config: UniterConfig, device: torch.device, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[str, list[UniterBatch]]]:
    """Endless (task, micro-batches of one optimizer step): the tasks take turns, one task per step."""
    if settings.source == "memory":
        batches = make_batches(config, settings.tasks, settings.token_budget,
                               settings.batches * settings.accumulation, min_regions=settings.min_regions,
                               max_regions=settings.max_regions, seed=rank, data_dir=settings.data_dir,
                               data=settings.data)
        by_task: dict[str, list[UniterBatch]] = defaultdict(list)
        for task, batch in batches:
            by_task[task].append(batch.to(device))
        n = settings.accumulation
        per_step = [(task, by_task[task][i * n:(i + 1) * n])
                    for i in range(settings.batches) for task in settings.tasks]
        yield from itertools.cycle(per_step)
        return
    folder = dataset_folder(settings, config)
    loader_config = LoaderConfig(token_budget=settings.token_budget, split="resampled", seed=rank,
                                 num_workers=settings.workers, max_text_len=None)
    streams = {task: iter(build_loader([folder], task, loader_config, rank=rank, world_size=world))
               for task in settings.tasks}
    for task in itertools.cycle(settings.tasks):
        yield task, [next(streams[task]) for _ in range(settings.accumulation)]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def measure(step: Callable[[str, list[UniterBatch]], None], feed: Iterator[tuple[str, list[UniterBatch]]],
            device: torch.device, settings: BenchSettings, padded: Callable[[UniterBatch], int],
            config: UniterConfig) -> dict[str, Any]:
    """Time ``step`` over warm-up + timed windows; the time to get the next batch counts (it is what a
    training step waits for; zero for pre-built batches)."""
    for _ in range(settings.warmup):
        step(*next(feed))
    synchronize(device)
    step_times: list[float] = []
    per_task: dict[str, list[float]] = defaultdict(list)
    samples = real = padded_tokens = 0
    flops = 0.0
    window_rates = []
    for _ in range(settings.windows):
        window_start = time.perf_counter()
        window_samples = 0
        for _ in range(settings.steps):
            start = time.perf_counter()
            task, micro = next(feed)
            step(task, micro)
            synchronize(device)
            elapsed = time.perf_counter() - start
            step_times.append(elapsed)
            per_task[task].append(elapsed)
            for batch in micro:
                lengths = (batch.txt_lens + batch.img_lens).tolist()
                samples += batch.batch_size
                window_samples += batch.batch_size
                real += sum(lengths)
                padded_tokens += padded(batch)
                flops += training_flops(config, lengths)
        window_rates.append(window_samples / (time.perf_counter() - window_start))
    total = sum(step_times)
    quantiles = statistics.quantiles(step_times, n=10) if len(step_times) > 1 else step_times * 9
    return {
        "steps": len(step_times), "samples": samples, "seconds": total, "flops": flops,
        "real_tokens": real, "padded_tokens": padded_tokens,
        "samples_per_s": samples / total, "tokens_per_s": real / total, "padded_tokens_per_s": padded_tokens / total,
        "padding_fraction": 1 - real / padded_tokens if padded_tokens else 0.0,
        "step_time_s": {"median": statistics.median(step_times), "p10": quantiles[0], "p90": quantiles[-1]},
        "window_samples_per_s": window_rates,
        "tflops": flops / total / 1e12,
        "per_task_step_time_s": {task: statistics.median(times) for task, times in per_task.items()},
    }


def profile_steps(step: Callable[[str, list[UniterBatch]], None], feed: Iterator[tuple[str, list[UniterBatch]]],
                  device: torch.device, steps: int, trace: str | Path | None = None) -> dict[str, Any]:
    """Run ``steps`` steps under torch.profiler; where the time goes, by kind of operator."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(*next(feed))
        synchronize(device)
    if trace:
        prof.export_chrome_trace(str(trace))
    return summarize_profile(prof.key_averages(), device.type == "cuda")


# Operator name -> kind. Checked in order; the first match wins.
PROFILE_KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                "aten::_addmm_activation")),
    ("attention (softmax, fused SDPA)", ("aten::_softmax", "aten::_softmax_backward_data", "scaled_dot_product",
                                         "flash_attention", "efficient_attention", "aten::_safe_softmax")),
    ("dropout RNG", ("aten::bernoulli", "aten::native_dropout", "aten::uniform_")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("optimizer", ("adam", "lerp_", "addcdiv_", "addcmul_", "aten::sqrt", "_foreach")),
    ("communication", ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "broadcast", "gloo", "nccl")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                          "Memcpy", "aten::fill_", "aten::zero_")),
]


def summarize_profile(events: Any, on_gpu: bool) -> dict[str, Any]:
    rows = []
    for event in events:
        self_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if self_us > 0:
            rows.append((event.key, self_us, event.count))
    total = sum(us for _, us, _ in rows) or 1.0
    kinds: dict[str, float] = defaultdict(float)
    for name, us, _ in rows:
        lower = name.lower()
        kind = next((k for k, patterns in PROFILE_KINDS if any(p.lower() in lower for p in patterns)), "other")
        kinds[kind] += us
    rows.sort(key=lambda row: -row[1])
    by_kind = sorted(kinds.items(), key=lambda item: -item[1])
    return {"clock": "device self time" if on_gpu else "CPU self time", "total_ms": total / 1e3,
            "by_kind_percent": {kind: round(100 * us / total, 1) for kind, us in by_kind},
            "top_ops": [{"op": name, "self_ms": round(us / 1e3, 2), "percent": round(100 * us / total, 1),
                         "calls": count} for name, us, count in rows[:20]]}


# ---------------------------------------------------------------------------------------------
# The two systems
# ---------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under the deepspeed launcher its environment is used; alone, one rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500),
                               "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def kernel_choice(settings: BenchSettings) -> Iterator[None]:
    """The LayerNorm choice is read when the model is built; the SDPA backend while it runs."""
    from ..model import kernels

    previous = os.environ.get("UNITER_DS_LAYER_NORM")
    os.environ["UNITER_DS_LAYER_NORM"] = settings.layer_norm
    kernels._apex_fused_layer_norm.cache_clear()
    try:
        with sdpa_backend(settings.sdpa_backend):
            yield
    finally:
        if previous is None:
            os.environ.pop("UNITER_DS_LAYER_NORM", None)
        else:
            os.environ["UNITER_DS_LAYER_NORM"] = previous
        kernels._apex_fused_layer_norm.cache_clear()


def bench_ours(settings: BenchSettings, profile_trace: str | Path | None = None) -> dict[str, Any]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ..train.pretrain import optimizer_config, param_groups, train_step
    from ..train.scheduler import Stream

    rank, world = init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    on_gpu = device.type == "cuda"
    config = settings.model_config()
    with kernel_choice(settings):
        torch.manual_seed(0)
        model = UniterForPretraining(config)
        model.uniter.encoder.activation_checkpointing = settings.activation_checkpointing
        if settings.compile:
            model.uniter.encoder.compile_layers()
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": settings.accumulation,
            "gradient_clipping": 5.0, "zero_optimization": {"stage": settings.zero_stage},
            "optimizer": optimizer_config(1e-5, [0.9, 0.98], 1e-6, 0.01, on_gpu),
            "steps_per_print": 10**9,
        }
        if settings.precision in ("bf16", "fp16"):
            ds_config[settings.precision] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds_config)
        names = [f"bench/{t}" for t in sorted(set(settings.tasks))]
        window = {k: torch.zeros(len(names), dtype=torch.float64, device=device)
                  for k in ("loss", "items", "correct")}
        comm = device if on_gpu else torch.device("cpu")

        def step(task: str, micro: list[UniterBatch]) -> None:
            train_step(engine, micro, [Stream("bench", task)] * len(micro), device, comm, window, names)

        feed = step_batches(settings, config, device, rank, world)
        result = measure(step, feed, device, settings, lambda b: b.padded_tokens(), config)
        if settings.profile_steps and rank == 0:
            result["profile"] = profile_steps(step, feed, device, settings.profile_steps, profile_trace)
        elif settings.profile_steps:
            for _ in range(settings.profile_steps):  # the other ranks take part in the profiled steps
                step(*next(feed))
    result |= {"system": "uniter-ds", "zero_stage": settings.zero_stage, "precision": settings.precision,
               "kernels": active_kernels(model) | {"sdpa_backend": settings.sdpa_backend,
                                                   "torch.compile": str(settings.compile),
                                                   "optimizer": type(engine.optimizer).__name__},
               "memory": _memory(device)}
    return gather_ranks(result)


def gather_ranks(result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 gets per-GPU numbers (the mean over ranks) and totals (the sum); 1 rank: unchanged."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    result["world_size"] = world
    if world == 1:
        result["total_samples_per_s"] = result["samples_per_s"]
        result["total_tokens_per_s"] = result["tokens_per_s"]
        return result
    everyone: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, result)
    merged = dict(result)
    merged["per_rank_samples_per_s"] = [r["samples_per_s"] for r in everyone]
    for key in ("samples_per_s", "tokens_per_s", "padded_tokens_per_s", "tflops"):
        merged["total_" + key] = sum(r[key] for r in everyone)
        merged[key] = merged["total_" + key] / world  # per GPU
    merged["padding_fraction"] = 1 - sum(r["real_tokens"] for r in everyone) / sum(r["padded_tokens"] for r in everyone)
    merged["memory"] = {key: max(r["memory"][key] for r in everyone) for key in result["memory"]}
    return merged


def bench_baseline(settings: BenchSettings) -> dict[str, Any]:
    """Eager transformers BERT + torch AMP + torch.optim.AdamW; under the launcher wrapped in DDP
    (every rank its own batches, gradients all-reduced), alone a plain module."""
    from deepspeed.accelerator import get_accelerator

    rank, world = init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    config = settings.model_config()
    torch.manual_seed(0)
    model = BaselineUniter.from_uniter(UniterForPretraining(config)).to(device).train()
    if world > 1:
        # Each step trains one task's head: the other heads get no gradient that step.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    scaler = torch.amp.GradScaler(enabled=settings.precision == "fp16" and device.type == "cuda")

    def step(task: str, micro: list[UniterBatch]) -> None:
        for batch in micro:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = model(batch.to(device, non_blocking=True), task).loss / len(micro)
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def padded(batch: UniterBatch) -> int:
        return batch.batch_size * BaselineUniter.sequence_length(batch)

    feed = step_batches(settings, config, device, rank, world)
    result = measure(step, feed, device, settings, padded, config)
    result |= {"system": "baseline (transformers BertModel, padded layout, full-sequence heads, AdamW"
                         + (", DDP)" if world > 1 else ")"),
               "precision": settings.precision,
               "kernels": {"attention": "eager (transformers)", "layer_norm": "torch", "optimizer": "torch AdamW"},
               "memory": _memory(device)}
    return gather_ranks(result)


def with_utilisation(result: dict[str, Any], peak: tuple[float, str]) -> dict[str, Any]:
    tflops, label = peak
    result["peak"] = {"tflops": tflops, "what": label}
    result["mfu"] = result["tflops"] / tflops if tflops == tflops else None
    return result
