"""Data-loader throughput: samples/s per loader process, end to end from shards on disk.

Read + decode + task masking + token-budget batching + collation into ``UniterBatch``, for fixed
region counts (36, 100) or a range (10-100), 2048-d fp16 features and 1601-class soft labels, one
caption per image (the worst case: nothing amortised over captions; Conceptual Captions is like this).
``workers=0`` times one process doing everything (the number per worker process); ``workers=N`` a
DataLoader with N worker processes, as training uses it. ``via=("local", "http")`` reads the same
shards from disk and from a loopback HTTP server (``python -m http.server`` in its own process).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..data import LoaderConfig, LoaderStats, build_loader, synth_dataset
from ..provenance import cpu_name


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """``root`` served on 127.0.0.1 by ``python -m http.server`` in its own process; yields the base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()  # noqa: S310 -- loopback
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the loopback HTTP server on port {port} did not start")
        yield base
    finally:
        server.terminate()
        server.wait()


def measure_loader(source: Path | str, task: str, workers: int, token_budget: int, seconds: float) -> dict[str, Any]:
    config = LoaderConfig(num_workers=workers, token_budget=token_budget, split="resampled", seed=0,
                          shuffle_buffer=1000, max_text_len=None)
    loader = iter(build_loader([source], task, config))
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


def bench_data(regions: list[str], tasks: list[str], workers: list[int], *, images: int = 2000,
               token_budget: int = 8192, seconds: float = 5.0, data_dir: str | None = None,
               img_dim: int = 2048, img_label_dim: int = 1601, via: tuple[str, ...] = ("local",),
               report: Callable[[dict[str, Any]], None] = lambda row: None) -> dict[str, Any]:
    """Every (regions, task, workers, via) combination; ``regions`` entries are "36" or "10-100"."""
    torch.set_num_threads(1)
    root = Path(data_dir or Path(tempfile.gettempdir()) / "uniter-ds-bench")
    if not set(via) <= {"local", "http"}:
        raise ValueError(f"--via {list(via)}: expected local and/or http")
    folders = {}
    for spec in regions:
        low, _, high = spec.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"--regions {spec!r}: expected a count (36) or a range (10-100)")
        folders[spec] = root / f"data-{img_dim}-{img_label_dim}-{spec}-{images}"
        if not (folders[spec] / "manifest.json").exists():
            synth_dataset(folders[spec], images=images, img_dim=img_dim, img_label_dim=img_label_dim,
                          min_regions=int(low), max_regions=int(high or low), min_captions=1, max_captions=1,
                          max_shard_bytes=64 * 2**20)
    rows = []
    with contextlib.ExitStack() as servers:
        base = servers.enter_context(http_server(root)) if "http" in via else None
        for spec, folder in folders.items():
            for task in tasks:
                for count in workers:
                    for where in via:
                        source = folder if where == "local" else f"{base}/{folder.name}/"
                        row = {"regions": spec, "via": where,
                               **measure_loader(source, task, count, token_budget, seconds)}
                        rows.append(row)
                        report(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"benchmark": "data_loader", "date": time.strftime("%Y-%m-%d"), "commit": commit,
            "machine": cpu_name(), "token_budget": token_budget, "rows": rows}
