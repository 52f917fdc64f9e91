"""Conversion rate of the released UNITER databases (issue 13): images/s by number of worker processes.

Writes a realistic image database (2048-d features, 10-100 boxes, 1601-class soft labels, fp16, as the
released ones; plain msgpack or compressed npz values) and a text database with 5 captions per image,
using the test suite's fixture writer; then times `convert_uniter_db` with 1, 2, ... workers, and
today's single-process `convert original` on the same images as per-image npz files.

    python benchmarks/convert_rate.py --images 400 --workers 1 2 --out benchmarks/results/convert_rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_uniter_db import write_img_db, write_txt_db  # noqa: E402
from uniter_ds.data.convert import convert_original, convert_uniter_db  # noqa: E402
from uniter_ds.provenance import cpu_name, git_commit  # noqa: E402


def realistic_images(count: int, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    images = {}
    for i in range(count):
        n = int(rng.integers(10, 101))
        confident = int(rng.integers(10, n + 1))
        conf = np.sort(np.concatenate([rng.uniform(0.21, 1, confident), rng.uniform(0, 0.19, n - confident)]))[::-1]
        images[f"coco_train2014_{i:012d}.npz"] = {
            "features": rng.random((n, 2048), dtype=np.float32), "norm_bb": rng.random((n, 6), dtype=np.float32),
            "conf": conf.astype(np.float32), "soft_labels": rng.dirichlet(np.ones(1601), size=n).astype(np.float32)}
    return images


def timed(convert, *args, **kwargs) -> tuple[float, int]:
    start = time.perf_counter()
    manifest, report = convert(*args, **kwargs)
    return time.perf_counter() - start, report.images_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-rate-"))
    try:
        rng = np.random.default_rng(0)
        images = realistic_images(args.images, rng)
        rows = {str(k): {"input_ids": rng.integers(106, 28996, 12).tolist(), "img_fname": name, "raw": "a caption"}
                for k, name in enumerate(n for n in images for _ in range(5))}
        write_txt_db(work / "txt_db" / "pretrain.db", rows)
        rates = []
        for compressed in (False, True):
            img_db = work / "img_db" / ("compressed" if compressed else "plain")
            write_img_db(img_db, images, compressed=compressed)
            for workers in args.workers:
                seconds, written = timed(convert_uniter_db, [img_db], work / "txt_db" / "pretrain.db", work / "out",
                                         workers=workers)
                rates.append({"converter": "uniter-db", "values": "npz compressed" if compressed else "msgpack",
                              "workers": workers, "images": written, "seconds": round(seconds, 2),
                              "images_per_s": round(written / seconds, 1)})
                print(rates[-1], flush=True)
        npz = work / "npz"
        npz.mkdir()
        for name, arrays in images.items():
            np.savez(npz / name, **{k: a.astype(np.float16) for k, a in arrays.items()})
        (work / "txt.jsonl").write_text("".join(json.dumps({"id": t} | r) + "\n" for t, r in rows.items()))
        (work / "meta.json").write_text(json.dumps({"CLS": 101, "SEP": 102, "MASK": 103, "v_range": [106, 28996],
                                                    "toker": "bert-base-cased"}))
        seconds, written = timed(convert_original, npz, work / "txt.jsonl", work / "out")
        rates.append({"converter": "original (npz files, single process)", "values": "npz", "workers": 1,
                      "images": written, "seconds": round(seconds, 2), "images_per_s": round(written / seconds, 1)})
        print(rates[-1], flush=True)
        report = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "cores": os.cpu_count(),
                  "cpu": cpu_name(), "images": args.images, "rates": rates}
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
