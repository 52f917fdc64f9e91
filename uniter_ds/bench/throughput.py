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
import dataclasses
import gc
import itertools
import json
import os
import re
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import LoaderConfig, StreamDataset, build_loader, synth_dataset
from ..model import UniterConfig, UniterForPretraining
from ..model.inputs import UniterBatch
from ..model.kernels import active_kernels, sdpa_backend
from ..model.options import ModelOptions, apply_options, option_problems
from ..model.tasks import DEFAULT_BENCH_TASKS
from ..provenance import cpu_native_bf16, device_name, git_commit, git_dirty, package_versions
from ..train.distributed import init_distributed
from .baseline import BaselineUniter
from .flops import training_flops
from .memory import OUT_OF_MEMORY

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, without sparsity) from the datasheets, matched against
# torch.cuda.get_device_name in this order: the first pattern found in the name wins, so the PCIe and
# NVL cards come before the SXM parts, whose names carry no form factor ("NVIDIA H100 80GB HBM3").
GPU_PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.0, "H200 NVL"),
    ("H200", 989.0, "H200 SXM"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100", 989.0, "H100 SXM"),
    ("A100", 312.0, "A100"),
    ("V100", 125.0, "V100 (fp16)"),
)


# The bench's flag for each experiment-config key that option_problems names.
OPTION_FLAGS = {"model.cuda_graphs": "--cuda-graphs", "model.compile": "--compile",
                "model.packed_attention": "--packed-attention", "data.batching": "--batching"}


@dataclass
class BenchSettings:
    """One throughput measurement; the CLI flags of ``uniter-ds bench train`` map onto these fields."""

    preset: str = "base"
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 2
    token_budget: int = 4096  # text + regions incl. padding, per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCH_TASKS))
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
    optimizer: str = "torch"  # torch: torch's fused AdamW | deepspeed: DeepSpeed's FusedAdam (JIT-built)
    deepspeed_config: str | None = None  # a DeepSpeed JSON (precision and ZeRO stage are read from it)
    pack_row_len: int | None = None  # ours in the packed layout, rows of this many tokens; None: padded
    batching: str = "budget"  # budget | rows (the packed layout's row-filling batcher: one shape per batch)
    packed_attention: str = "auto"  # the packed layout's attention: nested (jagged) | mask (dense) | buckets | auto
    cuda_graphs: bool = False  # replay the encoder's layers from CUDA graphs (needs batching rows and a GPU)

    def __post_init__(self) -> None:
        checks = {"precision": self.precision in ("bf16", "fp16", "fp32"), "zero_stage": self.zero_stage in range(4),
                  "token_budget": self.token_budget > 0, "accumulation": self.accumulation >= 1,
                  "source": self.source in ("memory", "shards"), "layer_norm": self.layer_norm in ("auto", "torch",
                                                                                                     "apex"),
                  "warmup": self.warmup >= 0, "windows": self.windows >= 1, "steps": self.steps >= 1,
                  "batches": self.batches >= 1, "tasks": bool(self.tasks),
                  "optimizer": self.optimizer in ("torch", "deepspeed"),
                  "pack_row_len": self.pack_row_len is None or self.pack_row_len >= 1,
                  "batching": self.batching == "budget" or (self.batching == "rows" and self.pack_row_len is not None
                                                            and self.pack_row_len <= self.token_budget)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            hints = {"batching": " (rows: needs --layout packed and a budget >= --pack-row-len)"}
            raise ValueError("bench settings: invalid " + ", ".join(f"{n}={getattr(self, n)!r}{hints.get(n, '')}"
                                                                     for n in bad))
        for key, why in option_problems(self.options(), batching=self.batching):
            raise ValueError(f"{OPTION_FLAGS.get(key, key)}: {why}")

    def options(self) -> ModelOptions:
        return ModelOptions(activation_checkpointing=self.activation_checkpointing, compile=self.compile,
                            packed_attention=self.packed_attention, cuda_graphs=self.cuda_graphs)

    def model_config(self) -> UniterConfig:
        return UniterConfig.from_preset(self.preset, hidden_dropout_prob=0.1)


# ---------------------------------------------------------------------------------------------
# Devices, peaks, environment
# ---------------------------------------------------------------------------------------------


def default_precision(on_gpu: bool, flags: set[str] | None = None) -> str:
    """bf16 on GPUs and on CPUs that have it natively; fp32 on other CPUs."""
    return "bf16" if on_gpu or cpu_native_bf16(flags) else "fp32"


# A GPU is busy only with big micro-batches: UNITER-large bf16 on an H200 ran at 15-20% MFU with 8k
# tokens and 31% with 48k, in 47 GB (benchmarks/RESULTS.md, GPU), so 48k fits an 80-GB card too. On a CPU
# a micro-batch of 4k tokens already takes seconds.
GPU_TOKEN_BUDGET = 49152
CPU_TOKEN_BUDGET = 4096


def default_token_budget(preset: str, on_gpu: bool) -> int:
    """``bench train`` / ``compare``'s token budget per micro-batch when none is given."""
    return GPU_TOKEN_BUDGET if on_gpu and preset != "tiny" else CPU_TOKEN_BUDGET


def gpu_peak(name: str) -> tuple[float, str]:
    for pattern, peak, card in GPU_PEAKS:
        if pattern in name:
            return peak, f"{name} = {card}: dense bf16/fp16 peak {peak:g} TFLOP/s (datasheet)"
    return float("nan"), f"{name}: no peak in the table"


def device_peak(device: torch.device, precision: str = "fp32") -> tuple[float, str]:
    """(TFLOP/s, what it is): the datasheet table for GPUs; on CPU a measured 1024^3 matmul peak in
    the benchmark's precision (whether bf16 is fast depends on the CPU: see :func:`cpu_native_bf16`)."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
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
                    f"({tflops:.3f} TFLOP/s; native bf16: {'yes' if cpu_native_bf16() else 'no'})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Where a number was measured. Every field is best-effort: a report is never lost to this."""
    return {"device": device_name(device), "device_type": device.type, "cpu_count": os.cpu_count(),
            "git_commit": git_commit(), "git_dirty": git_dirty(), "cpu_native_bf16": cpu_native_bf16(),
            "torch_threads": torch.get_num_threads(), "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device) -> dict[str, float]:
    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["device_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        out["device_total_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return out


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure, including the ones cuBLAS / cuDNN report as their own errors."""
    return isinstance(error, torch.OutOfMemoryError) or any(marker in str(error) for marker in OUT_OF_MEMORY)


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


PACKED_ATTENTION_NAMES = {"nested": "nested attention", "mask": "block-diagonal mask",
                          "buckets": "samples gathered into length buckets"}


def layout_name(settings: BenchSettings, form: str) -> str:
    if settings.pack_row_len is None:
        return "padded"
    attention = PACKED_ATTENTION_NAMES[form]
    if settings.batching == "rows":
        return (f"packed, {settings.token_budget // settings.pack_row_len} rows of {settings.pack_row_len} "
                f"(row-filling batcher), {attention}")
    return f"packed, rows of {settings.pack_row_len}, {attention}"


def make_batches(config: UniterConfig, tasks: list[str], token_budget: int, count: int, *,
                 min_regions: int = 10, max_regions: int = 100, seed: int = 0,
                 data_dir: str | Path | None = None, data: str | None = None,
                 pack_row_len: int | None = None, batching: str = "budget") -> list[tuple[str, UniterBatch]]:
    """``count`` batches per task, kept in memory."""
    settings = BenchSettings(token_budget=token_budget, batches=count, min_regions=min_regions,
                             max_regions=max_regions, data_dir=str(data_dir) if data_dir else None, data=data)
    folder = dataset_folder(settings, config)
    out = []
    for task in tasks:
        stream = StreamDataset([folder], task, LoaderConfig(token_budget=token_budget, split="resampled", seed=seed,
                                                         num_workers=0, max_text_len=None, batching=batching,
                                                         **packed_layout(pack_row_len)))
        iterator = iter(stream)
        out += [(task, next(iterator)) for _ in range(count)]
    return out


def packed_layout(pack_row_len: int | None) -> dict[str, Any]:
    """The loader's layout settings for rows of ``pack_row_len`` tokens (None: the padded layout)."""
    return {"layout": "packed", "pack_row_len": pack_row_len} if pack_row_len else {"layout": "padded"}


def step_batches(settings: BenchSettings, config: UniterConfig, device: torch.device, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[str, list[UniterBatch]]]:
    """Endless (task, micro-batches of one optimizer step): the tasks take turns, one task per step."""
    if settings.source == "memory":
        batches = make_batches(config, settings.tasks, settings.token_budget,
                               settings.batches * settings.accumulation, min_regions=settings.min_regions,
                               max_regions=settings.max_regions, seed=rank, data_dir=settings.data_dir,
                               data=settings.data, pack_row_len=settings.pack_row_len, batching=settings.batching)
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
                                 num_workers=settings.workers, max_text_len=None, batching=settings.batching,
                                 **packed_layout(settings.pack_row_len))
    streams = {task: iter(build_loader([folder], task, loader_config, rank=rank, world_size=world))
               for task in settings.tasks}
    for task in itertools.cycle(settings.tasks):
        yield task, [next(streams[task]) for _ in range(settings.accumulation)]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class StepClock:
    """Per-step times without a host sync per step: on a GPU an event is recorded after each step and
    read once the window ends (the host runs ahead and queues the next step's kernels, as in
    training); on a CPU the host clock, which is the device clock there."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (waits for the device first)."""
        synchronize(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def micro_batch_lengths(batch: UniterBatch) -> list[int]:
    meta = batch.meta or {}
    if "lengths" in meta:
        return meta["lengths"]
    return (batch.txt_lens + batch.img_lens).tolist()


def measure(step: Callable[[str, list[UniterBatch]], None], feed: Iterator[tuple[str, list[UniterBatch]]],
            device: torch.device, settings: BenchSettings, padded: Callable[[UniterBatch], int],
            config: UniterConfig) -> dict[str, Any]:
    """Time ``step`` over warm-up + timed windows; the time to get the next batch counts (it is what a
    training step waits for; zero for pre-built batches). Per-micro-batch token counts are the ones
    actually run, beside the requested budget.

    With pre-built batches the warm-up runs each of them at least once: on a GPU the first step of a
    new shape pays one-off costs (cuDNN attention builds an execution plan per shape, the caching
    allocator grows, cuBLAS picks kernels), which the first GPU run showed as a 3x slower first
    window. What a stream of ever-new shapes costs is measured with ``source="shards"``.

    The warm-up is timed apart (``warmup``): its first step pays torch.compile's compilation (with
    ``compile``), which ``compile_s`` estimates as that step's time less a timed step's median."""
    warmup = settings.warmup
    if settings.source == "memory":
        warmup = max(warmup, settings.batches * len(settings.tasks))
    warm_start, first_step = time.perf_counter(), None
    for index in range(warmup):
        step(*next(feed))
        if index == 0:
            synchronize(device)
            first_step = time.perf_counter() - warm_start
    synchronize(device)
    warm_seconds = time.perf_counter() - warm_start
    reset_memory(device)
    step_times: list[float] = []
    per_task: dict[str, list[float]] = defaultdict(list)
    samples = real = padded_tokens = micro_batches = 0
    flops = 0.0
    window_rates = []
    for _ in range(settings.windows):
        clock = StepClock(device)
        clock.mark()
        window_start = time.perf_counter()
        window_samples = 0
        tasks = []
        for _ in range(settings.steps):
            task, micro = next(feed)
            step(task, micro)
            clock.mark()
            tasks.append(task)
            for batch in micro:
                lengths = micro_batch_lengths(batch)
                micro_batches += 1
                samples += len(lengths)
                window_samples += len(lengths)
                real += sum(lengths)
                padded_tokens += padded(batch)
                flops += training_flops(config, lengths)
        times = clock.intervals()
        window_rates.append(window_samples / (time.perf_counter() - window_start))
        step_times += times
        for task, elapsed in zip(tasks, times):
            per_task[task].append(elapsed)
    total = sum(step_times)
    quantiles = statistics.quantiles(step_times, n=10) if len(step_times) > 1 else step_times * 9
    return {
        "steps": len(step_times), "samples": samples, "seconds": total, "flops": flops,
        "real_tokens": real, "padded_tokens": padded_tokens, "micro_batches": micro_batches,
        "mean_real_tokens_per_micro_batch": real / micro_batches,
        "mean_padded_tokens_per_micro_batch": padded_tokens / micro_batches,
        "budget_fill": padded_tokens / micro_batches / settings.token_budget,
        "samples_per_s": samples / total, "tokens_per_s": real / total, "padded_tokens_per_s": padded_tokens / total,
        "padding_fraction": 1 - real / padded_tokens if padded_tokens else 0.0,
        "step_time_s": {"median": statistics.median(step_times), "p10": quantiles[0], "p90": quantiles[-1]},
        "window_samples_per_s": window_rates,
        "tflops": flops / total / 1e12,
        "per_task_step_time_s": {task: statistics.median(times) for task, times in per_task.items()},
        "warmup": {"steps": warmup, "seconds": warm_seconds, "first_step_s": first_step},
        "compile_s": (max(0.0, first_step - statistics.median(step_times))
                      if (settings.compile or settings.cuda_graphs) and first_step is not None else None),
    }


def profile_steps(step: Callable[[str, list[UniterBatch]], None], feed: Iterator[tuple[str, list[UniterBatch]]],
                  device: torch.device, steps: int, trace: str | Path | None = None) -> dict[str, Any]:
    """Run ``steps`` steps under torch.profiler; where the time goes, by kind of kernel (GPU) or
    operator (CPU), and the profiled wall time per step to compare the kernel time with."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(feed))
        synchronize(device)
        wall = time.perf_counter() - start
    if trace:
        prof.export_chrome_trace(str(trace))
    rows = profile_rows(prof.key_averages(), device.type == "cuda")
    summary = summarize_profile(rows, device.type == "cuda")
    summary["steps"] = steps
    summary["wall_ms_per_step"] = 1e3 * wall / steps
    summary["busy_ms_per_step"] = summary["total_ms"] / steps
    summary["busy_fraction"] = summary["busy_ms_per_step"] / summary["wall_ms_per_step"]
    return summary


def is_annotation(name: str) -> bool:
    """A profiler annotation such as ``Optimizer.step#AdamW.step``: on the GPU timeline it spans kernels
    that have rows of their own (kernel names like ``...{lambda()#3}...`` are not annotations)."""
    return re.fullmatch(r"[\w.\-]+#[\w.\-]+", name) is not None


def profile_rows(events: Any, on_gpu: bool) -> list[dict[str, Any]]:
    """(name, self time in us, calls, where) for every profiler row that took time on the clock that
    matters: on a GPU the device rows only (kernels, memcpy, memset), whose self times partition the
    GPU's busy time; the CPU operators that launched them would count the same time again."""
    rows = []
    for event in events:
        is_device_row = str(getattr(event, "device_type", "")).endswith("CUDA")
        if on_gpu:
            if not is_device_row or getattr(event, "is_user_annotation", False) or is_annotation(event.key):
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key, "self_us": float(us), "calls": int(event.count),
                         "where": "device" if is_device_row else "cpu"})
    return rows


# CUDA kernel name -> kind, checked in order (the first match wins): a fused attention kernel may be a
# CUTLASS kernel, an optimizer kernel a multi-tensor apply, so the specific kinds come first. Checked
# against the kernel rows of a real profile (tests/data/h200_profile_rows.json).
GPU_KERNEL_KINDS = [
    ("communication", ("nccl", "allreduce", "all_reduce", "reducescatter", "reduce_scatter", "allgather",
                       "all_gather", "broadcast")),
    ("optimizer", ("adam", "multi_tensor_apply", "multitensorapply", "_foreach", "foreach")),
    ("losses", ("logsoftmax", "log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("fmha", "flash", "attention", "sdpa", "softmax", "compute_dot_do_o")),
    ("GEMM", ("gemm", "nvjet", "xmma", "cublas", "cutlass", "s16816", "s1688", "splitk", "matmul", "triton_tem_",
              "_mm_", "bmm")),
    ("layer norm", ("layer_norm", "layernorm", "gammabeta", "rms_norm")),
    ("copies and layout", ("memcpy", "memset", "catarray", "direct_copy", "copy_kernel", "transpose")),
    ("indexing (embedding backward, gather)", ("radix_sort", "segment", "unique_by_key", "scan::", "index",
                                               "gather", "scatter", "embedding")),
    ("elementwise (GELU, dropout, add, reductions)", ("elementwise", "reduce_kernel", "dropout", "gelu", "triton_",
                                                     "masked_scale", "fill", "where", "mul", "add", "bernoulli",
                                                     "philox", "sum", "mean", "pow", "sqrt", "clamp")),
]

# CPU operator name -> kind, as above.
CPU_OP_KINDS = [
    ("communication", ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "broadcast", "gloo", "nccl")),
    ("optimizer", ("adam", "lerp_", "addcdiv_", "addcmul_", "_foreach")),
    ("attention", ("aten::_softmax", "aten::_softmax_backward_data", "scaled_dot_product", "flash_attention",
                   "efficient_attention", "aten::_safe_softmax")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "aten::_addmm_activation")),
    ("dropout RNG", ("aten::bernoulli", "aten::native_dropout", "aten::uniform_")),
    ("copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::fill_",
                "aten::zero_")),
    ("elementwise and norm", ("layer_norm", "gelu", "aten::add", "aten::mul", "aten::div", "aten::sub", "aten::where",
                              "aten::index", "aten::gather", "aten::cat", "aten::sum", "aten::mean")),
]


def classify(name: str, on_gpu: bool) -> str:
    lower = name.lower()
    for kind, patterns in GPU_KERNEL_KINDS if on_gpu else CPU_OP_KINDS:
        if any(pattern in lower for pattern in patterns):
            return kind
    return "other"


def summarize_profile(rows: list[dict[str, Any]], on_gpu: bool) -> dict[str, Any]:
    total = sum(row["self_us"] for row in rows) or 1.0
    kinds: dict[str, float] = defaultdict(float)
    for row in rows:
        kinds[classify(row["name"], on_gpu)] += row["self_us"]
    rows = sorted(rows, key=lambda row: -row["self_us"])
    by_kind = sorted(kinds.items(), key=lambda item: -item[1])
    return {"clock": "GPU kernel time" if on_gpu else "CPU self time", "total_ms": total / 1e3,
            "by_kind_percent": {kind: round(100 * us / total, 1) for kind, us in by_kind},
            "top": [{"name": row["name"][:160], "kind": classify(row["name"], on_gpu),
                     "self_ms": round(row["self_us"] / 1e3, 3), "percent": round(100 * row["self_us"] / total, 1),
                     "calls": row["calls"]} for row in rows[:25]],
            "other": [row["name"][:160] for row in rows if classify(row["name"], on_gpu) == "other"][:20]}


# ---------------------------------------------------------------------------------------------
# The two systems
# ---------------------------------------------------------------------------------------------


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


def default_deepspeed_config(zero_stage: int, precision: str) -> Path | None:
    """The repository's ``ds_configs/zero{stage}_{precision}.json`` (what pretraining recipes use),
    when this package runs from a checkout; None for an installed package without it."""
    path = Path(__file__).resolve().parents[2] / "ds_configs" / f"zero{zero_stage}_{precision}.json"
    return path if path.exists() else None


def bench_deepspeed_config(settings: BenchSettings, on_gpu: bool) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config of a measurement and where it came from: ``settings.deepspeed_config``,
    else ``ds_configs/zero{Z}_{P}.json``, else the bare equivalent; plus what the bench manages
    (micro-batch, accumulation, clipping, optimizer) exactly as pretraining sets it."""
    from ..train.engine import optimizer_config

    path = Path(settings.deepspeed_config) if settings.deepspeed_config else default_deepspeed_config(
        settings.zero_stage, settings.precision)
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"--deepspeed-config: {path} does not exist")
        config = json.loads(path.read_text())
        source = str(path)
    else:
        config = {"zero_optimization": {"stage": settings.zero_stage}}
        if settings.precision in ("bf16", "fp16"):
            config[settings.precision] = {"enabled": True}
        source = "built in (no ds_configs/ beside the package)"
    config |= {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": settings.accumulation,
               "gradient_clipping": 5.0, "steps_per_print": 10**9,
               "optimizer": optimizer_config(1e-5, [0.9, 0.98], 1e-6, 0.01, on_gpu, settings.optimizer)}
    config.pop("train_batch_size", None)
    for key, why in option_problems(settings.options(), zero_optimization=config.get("zero_optimization", {})):
        raise ValueError(f"{OPTION_FLAGS.get(key, key)} with {source}: {why}")
    return config, source


def precision_of(ds_config: dict[str, Any]) -> str:
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled"):
            return name
    return "fp32"


Record = Callable[[int, dict[str, Any]], None]


def sweep(settings: BenchSettings, budgets: list[int], measure_budget: Callable[[BenchSettings], dict[str, Any]],
          record: Record, device: torch.device) -> None:
    """Measure each budget in increasing order with one model; ``record`` gets each result as soon as
    it exists. An allocation failure is recorded as such, and the larger budgets are recorded as not
    tried (they need more memory); any other error propagates."""
    budgets = sorted(budgets)
    for i, budget in enumerate(budgets):
        try:
            result = measure_budget(dataclasses.replace(settings, token_budget=budget))
        except Exception as error:  # noqa: BLE001 - only allocation failures are a result
            if not is_out_of_memory(error):
                raise
            message = str(error).splitlines()[0][:300]
            del error
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record(budget, {"status": "out of memory", "error": message, "memory": _memory(device)})
            for larger in budgets[i + 1:]:
                record(larger, {"status": "not tried", "error": f"{budget} tokens did not fit"})
            return
        record(budget, result | {"status": "ok"})


def bench_ours(settings: BenchSettings, budgets: list[int], record: Record, profile_budget: int | None = None,
               profile_trace: Callable[[int], str | Path | None] | None = None) -> None:
    """Our DeepSpeed engine and the pretraining step, built once, over ``budgets``."""
    import deepspeed

    from ..model.kernels import attention_backend
    from ..train.engine import param_groups
    from ..train.scheduler import Stream
    from ..train.step import new_window, train_step

    rank, world, device = init_distributed()
    on_gpu = device.type == "cuda"
    config = settings.model_config()
    ds_config, ds_source = bench_deepspeed_config(settings, on_gpu)
    settings = dataclasses.replace(settings, precision=precision_of(ds_config),
                                   zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision, torch.float32)
    with kernel_choice(settings):
        torch.manual_seed(0)
        model = UniterForPretraining(config)
        apply_options(model, settings.options())
        form = model.uniter.encoder.packed_attention_form(torch.empty(0, device=device))
        if settings.pack_row_len is None:
            form = "padded"
        ran = attention_backend(config.num_attention_heads, config.head_dim, config.attention_probs_dropout_prob,
                                device, dtype, settings.sdpa_backend, packed=form == "mask", nested=form == "nested")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds_config)
        names = [f"bench/{t}" for t in sorted(set(settings.tasks))]
        window = new_window(names, device)
        comm = device if on_gpu else torch.device("cpu")
        kernels = active_kernels(model) | {"sdpa_backend_requested": settings.sdpa_backend,
                                           "sdpa_backend_ran": ran,
                                           "torch.compile": "encoder layers, IPOT" if settings.compile else "off",
                                           "layout": layout_name(settings, form),
                                           "optimizer": type(engine.optimizer).__name__,
                                           "adamw": settings.optimizer}

        def step(task: str, micro: list[UniterBatch]) -> None:
            train_step(engine, micro, [Stream("bench", task)] * len(micro), device, comm, window, names)

        def one_budget(at: BenchSettings) -> dict[str, Any]:
            feed = step_batches(at, config, device, rank, world)
            result = measure(step, feed, device, at, lambda b: b.padded_tokens(), config)
            result["memory"] = _memory(device)
            if at.profile_steps and at.token_budget == (profile_budget or at.token_budget):
                if rank == 0:
                    trace = profile_trace(at.token_budget) if profile_trace else None
                    result["profile"] = profile_steps(step, feed, device, at.profile_steps, trace)
                else:  # the other ranks take part in the profiled steps
                    for _ in range(at.profile_steps):
                        step(*next(feed))
            graphs = f"{len(model.uniter.encoder.graphs.captured)} shape(s) captured" if at.cuda_graphs else "off"
            result |= {"token_budget": at.token_budget, "system": "uniter-ds", "zero_stage": at.zero_stage,
                       "precision": at.precision, "deepspeed_config": ds_source,
                       "kernels": kernels | {"cuda_graphs": graphs}}
            return gather_ranks(result)

        sweep(settings, budgets, one_budget, record, device)


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
    merged["mean_real_tokens_per_micro_batch"] = (sum(r["real_tokens"] for r in everyone)
                                                  / sum(r["micro_batches"] for r in everyone))
    merged["mean_padded_tokens_per_micro_batch"] = (sum(r["padded_tokens"] for r in everyone)
                                                    / sum(r["micro_batches"] for r in everyone))
    merged["budget_fill"] = merged["mean_padded_tokens_per_micro_batch"] / result["token_budget"]
    merged["memory"] = {key: max(r["memory"][key] for r in everyone) for key in result["memory"]}
    return merged


def bench_baseline(settings: BenchSettings, budgets: list[int], record: Record) -> None:
    """Eager transformers BERT + torch AMP + torch.optim.AdamW (fused where it exists, as ours); under
    the launcher wrapped in DDP (every rank its own batches, gradients all-reduced), alone a plain module."""
    rank, world, device = init_distributed()
    config = settings.model_config()
    torch.manual_seed(0)
    model = BaselineUniter.from_uniter(UniterForPretraining(config)).to(device).train()
    if world > 1:
        # Each step trains one task's head: the other heads get no gradient that step.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                                  fused=True)
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

    def one_budget(at: BenchSettings) -> dict[str, Any]:
        feed = step_batches(at, config, device, rank, world)
        result = measure(step, feed, device, dataclasses.replace(at, compile=False), padded, config)  # eager
        result |= {"token_budget": at.token_budget,
                   "system": "baseline (transformers BertModel, padded layout, full-sequence heads, fused AdamW"
                             + (", DDP)" if world > 1 else ")"),
                   "precision": at.precision,
                   "kernels": {"attention": "eager (transformers)", "layer_norm": "torch",
                               "optimizer": "torch AdamW (fused)"},
                   "memory": _memory(device)}
        return gather_ranks(result)

    sweep(settings, budgets, one_budget, record, device)


def with_utilisation(result: dict[str, Any], peak: tuple[float, str]) -> dict[str, Any]:
    if result.get("status", "ok") != "ok":
        return result
    tflops, label = peak
    result["peak"] = {"tflops": tflops, "what": label}
    result["mfu"] = result["tflops"] / tflops if tflops == tflops else None
    return result
