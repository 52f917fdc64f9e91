"""Data-loader benchmark: samples/s per loader process, end to end from shards on disk.

Read + decode + task masking + token-budget batching + collation into UniterBatch, for fixed region
counts (36 and 100), 2048-d fp16 features and 1601-class soft labels, one caption per image (the
worst case: nothing amortised over captions; Conceptual Captions is like this).

    python benchmarks/data_loader.py --out benchmarks/results/data_loader.json

``--workers 0`` times one process doing everything (the number per worker process); ``--workers N``
times a DataLoader with N worker processes, as training uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from uniter_ds.data import LoaderConfig, LoaderStats, build_loader, synth_dataset


def measure(folder: Path, task: str, workers: int, token_budget: int, seconds: float) -> dict:
    config = LoaderConfig(num_workers=workers, token_budget=token_budget, split="resampled", seed=0,
                          shuffle_buffer=1000, max_text_len=None)
    loader = iter(build_loader([folder], task, config))
    stats = LoaderStats()
    for _ in range(3 + 2 * workers):  # warm-up: worker start, shuffle buffer fill, page cache
        next(loader)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(loader)
        stats.update(batch)
        samples += batch.batch_size
    elapsed = time.perf_counter() - start
    totals = stats.totals()
    return {"task": task, "workers": workers, "samples": samples, "seconds": round(elapsed, 2),
            "samples_per_s": round(samples / elapsed, 1),
            "samples_per_s_per_process": round(samples / elapsed / max(workers, 1), 1),
            "batches": totals["batches"], "mean_batch_size": round(samples / max(totals["batches"], 1), 1),
            "padding_fraction": round(totals["padding_fraction"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", nargs="+", default=["36", "100", "10-100"],
                        help="regions per image: fixed (36) or a range drawn uniformly (10-100)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--tasks", nargs="+", default=["mlm", "mrfr", "mrc-kl", "itm"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--data-dir", help="where to write the synthetic shards (default: a temporary folder)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="uniter-ds-bench-"))
    rows = []
    for regions in args.regions:
        low, _, high = regions.partition("-")
        folder = root / f"synth-{regions}"
        if not (folder / "manifest.json").exists():
            synth_dataset(folder, images=args.images, img_dim=2048, img_label_dim=1601, min_regions=int(low),
                          max_regions=int(high or low), min_captions=1, max_captions=1, max_shard_bytes=64 * 2**20)
        for task in args.tasks:
            for workers in args.workers:
                row = {"regions": regions, **measure(folder, task, workers, args.token_budget, args.seconds)}
                rows.append(row)
                print(f"regions {regions:>6}  {task:<6} workers {workers}  {row['samples_per_s']:>8.1f} samples/s  "
                      f"({row['samples_per_s_per_process']:.1f} per process)  batch {row['mean_batch_size']:.1f}  "
                      f"padding {100 * row['padding_fraction']:.1f}%", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "data_loader", "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "token_budget": args.token_budget, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
