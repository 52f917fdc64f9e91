"""``uniter-ds bench train|compare|memory|data``: the benchmark suite's entry point.

``train`` and ``compare`` take one or several token budgets (a sweep), run in this process or, with
``--num-gpus``/``--hostfile``, under the ``deepspeed`` launcher (rank 0 reports per-GPU and total
numbers). Every command writes a JSON report (``--out``) with PNG plots beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..model.tasks import DEFAULT_BENCH_TASKS, TASKS

LAUNCHER_OPTIONS = ("--num-gpus", "--num-nodes", "--hostfile", "--master-port")


def _settings(args: argparse.Namespace, token_budget: int) -> Any:
    from .throughput import BenchSettings

    return BenchSettings(
        preset=args.preset, precision=args.precision, zero_stage=args.zero, token_budget=token_budget,
        accumulation=args.accumulation, tasks=args.tasks, source=args.source, data=args.data, data_dir=args.data_dir,
        workers=args.workers, batches=args.batches, min_regions=args.min_regions, max_regions=args.max_regions,
        warmup=args.warmup, windows=args.windows, steps=args.steps, compile=args.compile, layer_norm=args.layer_norm,
        sdpa_backend=args.sdpa_backend, activation_checkpointing=args.activation_checkpointing,
        profile_steps=args.profile, optimizer=args.optimizer, deepspeed_config=args.deepspeed_config,
        pack_row_len=args.pack_row_len if args.layout == "packed" else None, batching=args.batching,
        packed_attention=args.packed_attention, cuda_graphs=args.cuda_graphs)


def _without_launcher_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in LAUNCHER_OPTIONS:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def _relaunch(args: argparse.Namespace) -> int:
    """Start this same bench command on every rank through the deepspeed launcher."""
    import torch

    from ..train.launch import launcher_options
    from .throughput import dataset_folder, default_token_budget

    budgets = args.token_budget or [default_token_budget(args.preset, torch.cuda.is_available())]
    for budget in budgets:  # write the synthetic shards once, before the ranks start
        settings = _settings(args, budget)
        dataset_folder(settings, settings.model_config())
    # The ranks read LOCAL_RANK from the environment instead of a --local_rank argument.
    command = [*launcher_options(args, torch.cuda.is_available()), "--no_local_rank"]
    command += ["--module", "uniter_ds.cli", "bench", *_without_launcher_options(args.argv)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    print(" ".join(command), flush=True)
    return subprocess.call(command, env=env)


def _print_run(run: dict[str, Any]) -> None:
    print(f"token budget {run['token_budget']}")
    print(f"  {'system':<9} {'samples/s':>10} {'tokens/s':>10} {'tokens/mb':>9} {'padding':>8} {'step p50':>9} "
          f"{'TFLOP/s':>8} {'MFU':>7} {'memory':>9}")
    for name in ("ours", "baseline"):
        if name not in run:
            continue
        row = run[name]
        if row.get("status", "ok") != "ok":
            print(f"  {name:<9} {row['status']}: {row.get('error', '')}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        memory = row["memory"].get("device_peak_gb", row["memory"]["host_peak_rss_gb"])
        print(f"  {name:<9} {row['samples_per_s']:>10.1f} {row['tokens_per_s']:>10.0f} "
              f"{row['mean_real_tokens_per_micro_batch']:>9.0f} {100 * row['padding_fraction']:>7.1f}% "
              f"{row['step_time_s']['median']:>8.3f}s {row['tflops']:>8.3f} {mfu:>7} {memory:>7.2f}GB")
    ours = run.get("ours", {})
    if ours.get("status") == "ok" and ours.get("compile_s") is not None:
        print(f"  ours: compile / graph capture ~{ours['compile_s']:.1f} s in the first step "
              f"({ours['warmup']['first_step_s']:.1f} s), not in the timed steps")
    if ours.get("status") == "ok" and ours["world_size"] > 1:
        print(f"  ours, {ours['world_size']} ranks in total: {ours['total_samples_per_s']:.1f} samples/s")
    if "speedup_samples_per_s" in run:
        print(f"  ours / baseline: {run['speedup_samples_per_s']:.2f}x samples/s per GPU")
    if "profile" in ours:
        profile = ours["profile"]
        kinds = ", ".join(f"{k} {v}%" for k, v in profile["by_kind_percent"].items())
        print(f"  where the time goes ({profile['clock']}, {profile['busy_ms_per_step']:.1f} of "
              f"{profile['wall_ms_per_step']:.1f} ms per step): {kinds}")
    sys.stdout.flush()


def _train(args: argparse.Namespace) -> int:
    if (args.num_gpus or args.hostfile) and "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    import torch

    from ..model.options import ModelOptions, option_problems
    from ..train.distributed import init_distributed
    from .throughput import (
        OPTION_FLAGS,
        bench_baseline,
        bench_ours,
        default_precision,
        default_token_budget,
        device_peak,
        environment,
        with_utilisation,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    for key, why in option_problems(ModelOptions(cuda_graphs=args.cuda_graphs), cuda_available=device.type == "cuda"):
        raise ValueError(f"{OPTION_FLAGS[key]}: {why}")
    if args.precision is None:
        args.precision = default_precision(device.type == "cuda")
    peak = device_peak(device, args.precision)
    out = Path(args.out) if args.out else None
    budgets = sorted(set(args.token_budget or [default_token_budget(args.preset, device.type == "cuda")]))
    profile_budget = args.profile_budget or budgets[-1]
    if args.profile and profile_budget not in budgets:
        raise ValueError(f"--profile-budget {profile_budget} is not one of the token budgets {budgets}")
    settings = dataclasses.asdict(_settings(args, budgets[0]))
    settings.pop("token_budget")
    report: dict[str, Any] = {
        "command": "uniter-ds bench " + " ".join(_without_launcher_options(args.argv)),
        "launcher": {"world_size": world}, "settings": settings, "environment": environment(device),
        "peak": {"tflops": peak[0], "what": peak[1]}, "complete": False,
        "runs": [{"token_budget": budget} for budget in budgets]}
    by_budget = {run["token_budget"]: run for run in report["runs"]}

    def recorder(system: str) -> Any:
        def record(budget: int, result: dict[str, Any]) -> None:
            run = by_budget[budget]
            run[system] = with_utilisation(result, peak)
            both = [run.get(name, {}) for name in ("ours", "baseline")]
            if all(r.get("status") == "ok" for r in both):
                run["speedup_samples_per_s"] = both[0]["samples_per_s"] / both[1]["samples_per_s"]
            if rank == 0:
                _print_run(run)
                if out:  # after every measurement: a later failure loses nothing measured before it
                    _write(report, out, None)

        return record

    trace = None
    if out and args.trace:
        def trace(budget: int) -> Path:
            return out.with_name(f"{out.stem}-trace-{budget}.json")

    bench_ours(_settings(args, budgets[0]), budgets, recorder("ours"), profile_budget, trace)
    _release_memory()
    if args.bench_command == "compare":
        bench_baseline(_settings(args, budgets[0]), budgets, recorder("baseline"))
        _release_memory()
    if rank != 0:
        return 0
    report["complete"] = True
    print(f"peak: {peak[1]}")
    if out:
        _write(report, out, None if args.no_plots else "training")
    return 0


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _memory(args: argparse.Namespace) -> int:
    import torch

    from .memory import memory_report, search_largest, subprocess_probe
    from .throughput import default_precision

    on_gpu = torch.cuda.is_available()
    if args.precision is None:
        args.precision = default_precision(on_gpu)
    limit = args.limit_gb
    if not on_gpu and limit is None:
        raise ValueError("bench memory on a CPU needs --limit-gb (host memory has no out-of-memory error to find)")
    train_args = ["--preset", args.preset, "--precision", args.precision, "--zero", str(args.zero),
                  "--tasks", *args.tasks, "--batches", "1", "--warmup", "0", "--windows", "1",
                  "--steps", str(len(args.tasks)), "--max-regions", str(args.max_regions),
                  "--min-regions", str(args.min_regions)]
    if args.activation_checkpointing:
        train_args.append("--activation-checkpointing")
    if args.data_dir:
        train_args += ["--data-dir", args.data_dir]
    workdir = Path(args.out).with_suffix("") if args.out else None  # REPORT/ holds each probe's own report
    probe = subprocess_probe(train_args, limit, on_gpu, workdir=workdir)
    largest, probes = search_largest(probe, args.start, args.max_budget, args.resolution)
    what = "device peak allocation" if on_gpu else "host peak RSS of the benchmark process"
    from .throughput import environment

    device = torch.device("cuda" if on_gpu else "cpu")
    report = {"command": "uniter-ds bench " + " ".join(args.argv), "environment": environment(device),
              "preset": args.preset, "precision": args.precision, "zero_stage": args.zero,
              "activation_checkpointing": args.activation_checkpointing, "tasks": args.tasks,
              **memory_report(largest, probes, limit, what)}
    print(f"largest token budget that fits: {largest if largest is not None else 'none'} "
          f"({args.preset}, {args.precision}, ZeRO-{args.zero}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; {what})")
    if args.out:
        _write(report, Path(args.out), None if args.no_plots else "memory")
    return 0 if largest is not None else 1


def _data(args: argparse.Namespace) -> int:
    from .data import bench_data

    def show(row: dict[str, Any]) -> None:
        print(f"regions {row['regions']:>6}  {row['task']:<6} {row['via']:<5} workers {row['workers']}  "
              f"{row['samples_per_s']:>8.1f} "
              f"samples/s  ({row['samples_per_s_per_process']:.1f} per process)  batch {row['mean_batch_size']:.1f}  "
              f"padding {100 * row['padding_fraction']:.1f}%", flush=True)

    report = bench_data(args.regions, args.tasks, args.workers, images=args.images, token_budget=args.token_budget,
                        seconds=args.seconds, data_dir=args.data_dir, via=tuple(args.via), report=show)
    report["command"] = "uniter-ds bench " + " ".join(args.argv)
    if args.out:
        _write(report, Path(args.out), None if args.no_plots else "data")
    return 0


def _write(report: dict[str, Any], out: Path, plots: str | None) -> None:
    """The JSON report (written whole to a temporary file, then renamed), plots beside it."""
    from . import plots as plotting

    out.parent.mkdir(parents=True, exist_ok=True)
    if plots:
        drawn = {"training": plotting.plot_training, "memory": plotting.plot_memory, "data": plotting.plot_data}[plots]
        try:
            report["plots"] = [path.name for path in drawn(_measured_only(report), out)]
        except Exception as error:  # noqa: BLE001 - a failed plot must not cost the numbers
            report["plots"] = []
            report["plot_error"] = f"{type(error).__name__}: {error}"
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out)
    if plots:
        print(f"wrote {out}" + (f" and {', '.join(report['plots'])}" if report.get("plots") else ""))


def _measured_only(report: dict[str, Any]) -> dict[str, Any]:
    """The report with only the measurements that finished (the plots' input)."""
    if "runs" not in report:
        return report
    runs = []
    for run in report["runs"]:
        kept = {key: value for key, value in run.items()
                if not isinstance(value, dict) or value.get("status", "ok") == "ok"}
        if "ours" in kept:
            runs.append(kept)
    return report | {"runs": runs}


def add_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmarks: training throughput, ours vs baseline, memory, data "
                                              "loader").add_subparsers(dest="bench_command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--preset", default="base", choices=["tiny", "base", "large"], help="model size")
        sub.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                         help="default: bf16 on a GPU or on a CPU with native bf16 (AVX512-BF16, AMX), else fp32")
        sub.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage")
        sub.add_argument("--tasks", nargs="+", default=list(DEFAULT_BENCH_TASKS), choices=TASKS,
                         help="tasks measured, in turn")
        sub.add_argument("--min-regions", type=int, default=10, help="regions per synthetic image: at least")
        sub.add_argument("--max-regions", type=int, default=100, help="regions per synthetic image: at most")
        sub.add_argument("--activation-checkpointing", action="store_true",
                         help="recompute each layer's activations in the backward pass (less memory)")
        sub.add_argument("--data-dir", help="where synthetic shards are written (reused across runs)")
        sub.add_argument("--out", help="JSON report; plots are written beside it")
        sub.add_argument("--no-plots", action="store_true", help="write the JSON report only")

    for name, text in (("train", "our DeepSpeed engine: real optimizer steps, as in pretraining"),
                       ("compare", "ours and the Hugging Face baseline on the same batches, and the ratio")):
        sub = bench.add_parser(name, help=text)
        common(sub)
        sub.add_argument("--token-budget", type=int, nargs="+",
                         help="tokens per micro-batch; several values: a sweep (default: 49152 on a GPU, where "
                              "smaller micro-batches leave it waiting on launches; 4096 on a CPU and for tiny)")
        sub.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
        sub.add_argument("--source", choices=["memory", "shards"], default="memory",
                         help="pre-built in-memory batches, or the live shard reader with DataLoader workers")
        sub.add_argument("--data", help="a dataset folder to read (default: synthetic shards)")
        sub.add_argument("--workers", type=int, default=2, help="DataLoader workers per task (--source shards)")
        sub.add_argument("--batches", type=int, default=4, help="pre-built batches per task (--source memory)")
        sub.add_argument("--warmup", type=int, default=3, help="steps before timing")
        sub.add_argument("--windows", type=int, default=3, help="timed windows")
        sub.add_argument("--steps", type=int, default=4, help="optimizer steps per timed window")
        sub.add_argument("--compile", action="store_true", help="torch.compile the encoder layers")
        sub.add_argument("--layout", choices=["padded", "packed"], default="padded",
                         help="ours: micro-batches as [samples, longest], or packed into rows of --pack-row-len")
        sub.add_argument("--pack-row-len", type=int, default=256, help="tokens per row of the packed layout")
        sub.add_argument("--batching", choices=["budget", "rows"], default="budget",
                         help="micro-batches of similar lengths within the budget, or (packed layout) exactly "
                              "budget // row-len rows filled from mixed lengths: one shape for every batch")
        sub.add_argument("--packed-attention", choices=["auto", "nested", "mask", "buckets"], default="auto",
                         help="the packed layout's attention: a jagged nested tensor per sample, dense rows "
                              "with a block-diagonal mask (one shape: what --cuda-graphs needs), or the samples "
                              "gathered into buckets of similar length (the fastest on CPU); auto: nested on "
                              "a GPU (mask with --cuda-graphs), buckets on a CPU")
        sub.add_argument("--cuda-graphs", action="store_true",
                         help="GPU: replay the encoder's layers from CUDA graphs (needs --layout packed "
                              "--batching rows)")
        sub.add_argument("--layer-norm", choices=["auto", "torch", "apex"], default="auto",
                         help="LayerNorm kernel (auto: apex's fused one where installed)")
        sub.add_argument("--sdpa-backend", choices=["auto", "math", "flash", "efficient", "cudnn"], default="auto",
                         help="the attention kernel SDPA may use (auto: PyTorch chooses)")
        sub.add_argument("--profile", type=int, default=0, metavar="STEPS",
                         help="then profile STEPS more steps: time by kind of operator in the report")
        sub.add_argument("--trace", action="store_true", help="with --profile: also write a Chrome trace")
        sub.add_argument("--threads", type=int, help="torch CPU threads")
        sub.add_argument("--profile-budget", type=int, help="the token budget to profile (default: the largest)")
        sub.add_argument("--optimizer", choices=["torch", "deepspeed"], default="torch",
                         help="AdamW: torch's fused kernel, or DeepSpeed's FusedAdam (a CUDA op built at first use)")
        sub.add_argument("--deepspeed-config", help="a DeepSpeed JSON to measure (precision and ZeRO stage are read "
                                                    "from it); default ds_configs/zero{Z}_{P}.json")
        for option in LAUNCHER_OPTIONS:
            sub.add_argument(option, type=str if option == "--hostfile" else int,
                             help="run under the deepspeed launcher" if option == "--num-gpus" else argparse.SUPPRESS)
        sub.set_defaults(run=_train)

    memory = bench.add_parser("memory", help="largest token budget per micro-batch that fits (a search of real "
                                             "training steps)")
    common(memory)
    memory.add_argument("--limit-gb", type=float, help="memory limit (CPU: required; GPU: default the card's memory)")
    memory.add_argument("--start", type=int, default=2048, help="the first token budget tried")
    memory.add_argument("--max-budget", type=int, default=262144, help="the largest token budget tried")
    memory.add_argument("--resolution", type=int, default=512, help="stop bisecting at this many tokens")
    memory.set_defaults(run=_memory)

    data = bench.add_parser("data", help="data-loader samples/s per process, from shards on disk")
    data.add_argument("--regions", nargs="+", default=["36", "100", "10-100"],
                      help="regions per image: fixed (36) or drawn uniformly from a range (10-100)")
    data.add_argument("--images", type=int, default=2000, help="synthetic images written per region setting")
    data.add_argument("--tasks", nargs="+", default=list(DEFAULT_BENCH_TASKS), choices=TASKS, help="a loader per task")
    data.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                      help="DataLoader workers per loader; several values: each measured")
    data.add_argument("--token-budget", type=int, default=8192, help="tokens per micro-batch")
    data.add_argument("--seconds", type=float, default=5.0, help="how long each setting is read")
    data.add_argument("--data-dir", help="where the synthetic shards are written")
    data.add_argument("--via", nargs="+", default=["local"], choices=["local", "http"],
                      help="read the shards from disk and/or from a loopback HTTP server")
    data.add_argument("--out", help="JSON report; a plot is written beside it")
    data.add_argument("--no-plots", action="store_true", help="write the JSON report only")
    data.set_defaults(run=_data)
