"""Conversion rate of the released UNITER databases (issue 13): images/s and peak memory by number of
worker processes.

Writes a realistic image database (2048-d features, 10-100 boxes, 1601-class soft labels, fp16, as the
released ones; plain msgpack or compressed npz values) and a text database with 5 captions per image,
using the test suite's fixture writer; then runs `convert_uniter_db` with 1, 2, ... workers, each in a
fresh Python process, so that the workers' start is paid as a user pays it, and samples (every 20 ms)
the private memory (RssAnon; LMDB's mapped file pages are page cache and not counted) of the converting
process and of its largest worker; and `convert original` on the same images as per-image npz files.
``--unique`` distinct images are generated and repeated under new names (the generator's memory stays
small at large ``--images``).

    python benchmarks/convert_rate.py --images 6000 --workers 1 2 --out benchmarks/results/convert_rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uniter_ds.data.uniter_db import write_img_db, write_txt_db  # noqa: E402
from uniter_ds.provenance import cpu_name, git_commit  # noqa: E402


def realistic_images(count: int, unique: int, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    distinct = []
    for _ in range(min(count, unique)):
        n = int(rng.integers(10, 101))
        confident = int(rng.integers(10, n + 1))
        conf = np.sort(np.concatenate([rng.uniform(0.21, 1, confident), rng.uniform(0, 0.19, n - confident)]))[::-1]
        distinct.append({
            "features": rng.random((n, 2048), dtype=np.float32).astype(np.float16),
            "norm_bb": rng.random((n, 6), dtype=np.float32).astype(np.float16), "conf": conf.astype(np.float16),
            "soft_labels": rng.dirichlet(np.ones(1601), size=n).astype(np.float16)})
    return {f"coco_train2014_{i:012d}.npz": distinct[i % len(distinct)] for i in range(count)}


CHILD = """
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
from uniter_ds.data.convert import {function}

def anon_mb(pid):  # private memory: LMDB's mapped file pages are page cache, counted apart
    try:
        with open(f"/proc/{{pid}}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
    except (OSError, StopIteration):
        return 0.0

peak = {{"self": 0.0, "worker": 0.0}}
def sample():
    while True:
        peak["self"] = max(peak["self"], anon_mb("self"))
        with open(f"/proc/self/task/{{threading.main_thread().native_id}}/children") as f:
            for pid in f.read().split():
                peak["worker"] = max(peak["worker"], anon_mb(pid))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
manifest, report = {function}(*{args!r}, **{kwargs!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "images": report.images_written, "shards": len(manifest.shards),
                  "peak_anon_mb": peak["self"], "worker_peak_anon_mb": peak["worker"]}}))
"""


def timed(function: str, *args, code_root: Path = ROOT, **kwargs) -> dict:
    """Run one conversion in a fresh interpreter; its time (from the call), images and peak memory."""
    args = [str(a) if isinstance(a, Path) else [str(x) for x in a] if isinstance(a, list) else a for a in args]
    code = CHILD.format(root=str(code_root), function=function, args=tuple(args), kwargs=kwargs)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"images": result["images"], "shards": result["shards"], "seconds": round(result["seconds"], 2),
            "images_per_s": round(result["images"] / result["seconds"], 1),
            "peak_anon_mb": round(result["peak_anon_mb"]), "worker_peak_anon_mb": round(result["worker_peak_anon_mb"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--unique", type=int, default=500, help="distinct images generated (repeated to --images)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", type=Path,
                        help="also time the uniter-db converter of this checkout (e.g. a git worktree of an older "
                        "commit) on the same databases")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-rate-"))
    try:
        rng = np.random.default_rng(0)
        images = realistic_images(args.images, args.unique, rng)
        rows = {str(k): {"input_ids": rng.integers(106, 28996, 12).tolist(), "img_fname": name, "raw": "a caption"}
                for k, name in enumerate(n for n in images for _ in range(5))}
        txt_db = work / "txt_db" / "pretrain.db"
        write_txt_db(txt_db, rows)
        rates = []
        for compressed in (False, True):
            img_db = work / "img_db" / ("compressed" if compressed else "plain")
            write_img_db(img_db, images, compressed=compressed)
            for workers in args.workers:
                rates.append({"converter": "uniter-db", "values": "npz compressed" if compressed else "msgpack",
                              "workers": workers} | timed("convert_uniter_db", [img_db], txt_db, work / "out",
                                                          workers=workers))
                print(rates[-1], flush=True)
            for workers in args.workers if args.baseline else []:
                rates.append({"converter": f"uniter-db at {git_commit(args.baseline)}",
                              "values": "npz compressed" if compressed else "msgpack", "workers": workers}
                             | timed("convert_uniter_db", [img_db], txt_db, work / "out", workers=workers,
                                     code_root=args.baseline))
                print(rates[-1], flush=True)
            shutil.rmtree(img_db)
        npz = work / "npz"
        npz.mkdir()
        for name, arrays in images.items():
            np.savez(npz / name, **arrays)
        (work / "txt.jsonl").write_text("".join(json.dumps({"id": t} | r) + "\n" for t, r in rows.items()))
        (work / "meta.json").write_text(json.dumps({"CLS": 101, "SEP": 102, "MASK": 103, "v_range": [106, 28996],
                                                    "toker": "bert-base-cased"}))
        rates.append({"converter": "original (npz files, single process)", "values": "npz", "workers": 1}
                     | timed("convert_original", npz, work / "txt.jsonl", work / "out"))
        print(rates[-1], flush=True)
        report = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "cores": os.cpu_count(),
                  "cpu": cpu_name(), "images": args.images, "unique_images": args.unique, "rates": rates}
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
