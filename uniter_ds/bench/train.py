"""Training throughput: our DeepSpeed engine vs the baseline, on the same pre-built batches.

Used by ``uniter-ds bench train`` and ``uniter-ds bench compare``. Each measurement: warm-up steps
(excluded), then several timed windows with the device synchronised before every clock read;
FLOPs from :mod:`uniter_ds.bench.flops` on real tokens (padding excluded).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import LoaderConfig, TaskStream, synth_dataset
from ..model import UniterConfig, UniterForPretraining
from ..model.inputs import UniterBatch
from ..model.kernels import active_kernels
from .baseline import BaselineUniter
from .flops import training_flops

# Dense bf16/fp16 peaks (TFLOP/s) by device name; PERFORMANCE.md.
GPU_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0}


def device_peak(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, what it is): a table for GPUs; on CPU a measured fp32 matmul peak, labelled as such."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name}: dense bf16 peak {peak} TFLOP/s (datasheet)"
        return float("nan"), f"{name}: no peak in the table"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        a @ b
    tflops = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    return tflops, f"CPU: measured fp32 {n}^3 matmul, {torch.get_num_threads()} threads ({tflops:.3f} TFLOP/s)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(config: UniterConfig, tasks: list[str], token_budget: int, count: int, *,
                 min_regions: int = 10, max_regions: int = 100, seed: int = 0,
                 data_dir: str | Path | None = None) -> list[tuple[str, UniterBatch]]:
    """``count`` batches per task from synthetic shards (written once), kept in memory."""
    folder = Path(data_dir or tempfile.mkdtemp(prefix="uniter-ds-bench-")) / (
        f"synth-{config.img_dim}-{config.img_label_dim}-{min_regions}-{max_regions}")
    if not (folder / "manifest.json").exists():
        images = max(200, count * token_budget // 40)
        synth_dataset(folder, images=images, img_dim=config.img_dim, img_label_dim=config.img_label_dim,
                      min_regions=min_regions, max_regions=max_regions, min_captions=1, max_captions=3, seed=seed,
                      num_classes=min(40, config.img_label_dim - 1), max_shard_bytes=64 * 2**20)
    out = []
    for task in tasks:
        stream = TaskStream([folder], task, LoaderConfig(token_budget=token_budget, split="resampled", seed=seed,
                                                         num_workers=0, max_text_len=None))
        iterator = iter(stream)
        out += [(task, next(iterator)) for _ in range(count)]
    return out


def _measure(step: Callable[[str, UniterBatch], None], batches: list[tuple[str, UniterBatch]], device: torch.device,
             warmup: int, windows: int, steps_per_window: int, padded: Callable[[UniterBatch], int],
             config: UniterConfig) -> dict[str, Any]:
    moved = [(task, batch.to(device)) for task, batch in batches]
    for i in range(warmup):
        step(*moved[i % len(moved)])
    synchronize(device)
    step_times: list[float] = []
    per_task: dict[str, list[float]] = defaultdict(list)
    samples = real = padded_tokens = 0
    flops = 0.0
    index = warmup
    window_rates = []
    for _ in range(windows):
        window_start = time.perf_counter()
        window_samples = 0
        for _ in range(steps_per_window):
            task, batch = moved[index % len(moved)]
            index += 1
            start = time.perf_counter()
            step(task, batch)
            synchronize(device)
            elapsed = time.perf_counter() - start
            step_times.append(elapsed)
            per_task[task].append(elapsed)
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
        "steps": len(step_times), "samples": samples,
        "samples_per_s": samples / total, "tokens_per_s": real / total, "padded_tokens_per_s": padded_tokens / total,
        "padding_fraction": 1 - real / padded_tokens if padded_tokens else 0.0,
        "step_time_s": {"median": statistics.median(step_times), "p10": quantiles[0], "p90": quantiles[-1]},
        "window_samples_per_s": window_rates,
        "tflops": flops / total / 1e12,
        "per_task_step_time_s": {task: statistics.median(times) for task, times in per_task.items()},
    }


def _environment(device: torch.device) -> dict[str, Any]:
    import deepspeed
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": name, "device_type": device.type, "cpu_count": os.cpu_count(), "git_commit": commit,
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d")}


def _memory(device: torch.device) -> dict[str, float]:
    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["device_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _ensure_distributed() -> None:
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            os.environ.setdefault(key, value)
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def bench_ours(config: UniterConfig, batches: list[tuple[str, UniterBatch]], *, zero_stage: int, precision: str,
               warmup: int, windows: int, steps_per_window: int, compile_model: bool = False) -> dict[str, Any]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ..train.pretrain import param_groups, train_step
    from ..train.scheduler import Stream

    _ensure_distributed()
    device = torch.device(get_accelerator().current_device_name())
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = UniterForPretraining(config)
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 5.0,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.98], "eps": 1e-6,
                                                   "torch_adam": not on_gpu, "adam_w_mode": True}},
        "steps_per_print": 10**9,
    }
    if precision in ("bf16", "fp16"):
        ds_config[precision] = {"enabled": True}
    if compile_model:
        ds_config["compile"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds_config)
    tasks = sorted({task for task, _ in batches})
    names = [f"bench/{t}" for t in tasks]
    window = {k: torch.zeros(len(names), dtype=torch.float64, device=device) for k in ("loss", "items", "correct")}
    comm = device if on_gpu else torch.device("cpu")

    def step(task: str, batch: UniterBatch) -> None:
        train_step(engine, [batch], [Stream("bench", task)], device, comm, window, names)

    result = _measure(step, batches, device, warmup, windows, steps_per_window, lambda b: b.padded_tokens(), config)
    result |= {"system": "uniter-ds", "zero_stage": zero_stage, "precision": precision,
               "kernels": active_kernels(model), "memory": _memory(device)}
    return result


def bench_baseline(config: UniterConfig, batches: list[tuple[str, UniterBatch]], *, precision: str, warmup: int,
                   windows: int, steps_per_window: int) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = BaselineUniter.from_uniter(UniterForPretraining(config)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")

    def step(task: str, batch: UniterBatch) -> None:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(batch, task).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def padded(batch: UniterBatch) -> int:
        return batch.batch_size * BaselineUniter.sequence_length(batch)

    result = _measure(step, batches, device, warmup, windows, steps_per_window, padded, config)
    result |= {"system": "baseline (transformers BertModel, padded layout, full-sequence heads, AdamW)",
               "precision": precision, "kernels": {"attention": "eager (transformers)", "layer_norm": "torch"},
               "memory": _memory(device)}
    return result


def with_utilisation(result: dict[str, Any], peak: tuple[float, str]) -> dict[str, Any]:
    tflops, label = peak
    result["peak"] = {"tflops": tflops, "what": label}
    result["mfu"] = result["tflops"] / tflops if tflops == tflops else None
    return result
