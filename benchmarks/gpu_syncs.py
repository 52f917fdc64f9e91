"""Where a training step waits for the host, on a GPU: every synchronising CUDA call in one step of
each task, for each ZeRO stage, with the line of our code or DeepSpeed's that made it.

    python benchmarks/gpu_syncs.py --preset tiny --out syncs.json

CUDA's sync debug mode in "warn" mode reports each synchronising call without stopping the step, so
one run lists them all (``uniter_ds.bench.syncs``; tests/test_gpu.py asserts none comes from our code).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch


def site(frame: traceback.FrameSummary) -> str:
    where = frame.filename.split("site-packages/")[-1].split("uniter_ds/")[-1]
    return f"{where}:{frame.lineno} {frame.name}: {frame.line}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: the same steps with no sync to look for (the script's own check in CI)")
    parser.add_argument("--tasks", nargs="+", default=["mlm", "itm", "mrfr", "mrc", "mrc-kl"])
    parser.add_argument("--out")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import deepspeed

    from uniter_ds.bench.samples import collate, random_sample
    from uniter_ds.bench.syncs import recorded_syncs
    from uniter_ds.bench.throughput import BenchSettings, bench_deepspeed_config
    from uniter_ds.model import UniterConfig, UniterForPretraining
    from uniter_ds.train.distributed import init_distributed
    from uniter_ds.train.engine import param_groups
    from uniter_ds.train.scheduler import Stream
    from uniter_ds.train.step import new_window, train_step

    _, _, device = init_distributed()
    on_gpu = device.type == "cuda"
    if not on_gpu and not args.dry_run:
        parser.error("needs a CUDA GPU (or --dry-run)")
    config = UniterConfig.from_preset(args.preset)
    generator = torch.Generator().manual_seed(0)
    data = {task: collate([random_sample(config, 12, 30, generator), random_sample(config, 9, 50, generator)],
                          itm_targets=[1, 0]) for task in args.tasks}
    if on_gpu:
        data = {task: batch.pin_memory() for task, batch in data.items()}
    names = [f"s/{task}" for task in args.tasks]
    report: dict[str, dict[str, dict[str, int]]] = {}
    for zero in args.zero:
        torch.manual_seed(0)
        model = UniterForPretraining(config)
        ds_config, source = bench_deepspeed_config(BenchSettings(zero_stage=zero, precision=args.precision), on_gpu)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds_config)
        window = new_window(names, device)
        for task in args.tasks:  # warm-up: first-step allocations and lazy set-up are not the steady state
            train_step(engine, [data[task]], [Stream("s", task)], device, device, window, names)
        synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
        synchronize()
        for task in args.tasks:
            with recorded_syncs() as frames:
                train_step(engine, [data[task]], [Stream("s", task)], device, device, window, names)
            synchronize()
            found = Counter(site(frame) for frame in frames)
            report.setdefault(f"zero{zero}-{args.precision} ({source})", {})[task] = dict(found)
            print(f"ZeRO-{zero} {args.precision} {task}: {sum(found.values())} synchronisations", flush=True)
            for where, count in found.most_common():
                print(f"    {count:>3}x {where}")
        del engine, model
        if on_gpu:
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
