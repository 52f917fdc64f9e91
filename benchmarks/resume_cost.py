"""What a resume costs at step 20 and at step 2,000 (issue 14): time from the start of the checkpoint
load to the end of the first new step, with ``data.resume: exact`` (each loader worker restored from
its saved place) and ``replay`` (the batches already used are read again).

A real job (the deepspeed launcher, CPU ranks, the tiny model) on realistic features (2048-d,
10-36 regions, 1601-class soft labels), four tasks, resampled split: one run stopped at each step
with a checkpoint; each resume runs in a copy of its run directory, stops one step later, and
reports ``result.json["resume"]`` (measured inside the job: the launcher's start is not in it).

    python benchmarks/resume_cost.py --steps 20 2000 --modes exact replay \
        --out benchmarks/results/resume_cost.json
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uniter_ds.data import synth_dataset  # noqa: E402
from uniter_ds.provenance import cpu_name, git_commit  # noqa: E402
from uniter_ds.train.extensions import extensions_dir  # noqa: E402
from uniter_ds.train.launch import deepspeed_executable, free_port  # noqa: E402


def cpu_env() -> dict[str, str]:
    """CPU ranks, as `uniter-ds pretrain` starts them without a GPU (one thread per rank: 2 ranks, 2 cores)."""
    return dict(os.environ) | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(extensions_dir()))}


def launch(config: Path, *extra: str, ranks: int) -> float:
    started = time.perf_counter()
    result = subprocess.run([deepspeed_executable(), "--num_gpus", str(ranks), "--master_port", str(free_port()),
                             "--module", "uniter_ds.train.pretrain", "--config", str(config), *extra],
                            cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"job failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 2000])
    parser.add_argument("--modes", nargs="+", default=["exact", "replay"], choices=["exact", "replay", "reseed"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per stream")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="resume-cost-"))
    data = work / "data"
    if not (data / "manifest.json").exists():
        synth_dataset(data, images=args.images, img_dim=2048, img_label_dim=1601, min_regions=10, max_regions=36,
                      seed=0, max_shard_bytes=32 * 2**20)
    config = {
        "seed": 1, "deepspeed_config": str(ROOT / "ds_configs" / "cpu.json"),
        "model": {"preset": "tiny", "overrides": {"img_dim": 2048, "img_label_dim": 1601}},
        "data": {"train": [{"name": "synth", "paths": [str(data)],
                            "tasks": {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2}}],
                 "val": [], "token_budget": args.token_budget, "num_workers": args.workers, "split": "resampled"},
        "optim": {"lr": 1e-4, "warmup_steps": 10, "total_steps": 100_000},
        "eval": {"every": 0, "at_end": False}, "checkpoint": {"every": 0, "at_end": True, "keep_last": 1},
        "tracking": {"mlflow": False, "log_every": 100},
    }
    rows = []
    for steps in args.steps:
        run = work / f"run{steps}"
        path = work / f"run{steps}.yaml"
        path.write_text(yaml.safe_dump(config | {"run_dir": str(run)}))
        if not (run / "checkpoints" / "latest").exists():
            seconds = launch(path, "--set", f"stop_at_step={steps}", ranks=args.ranks)
            print(f"trained to step {steps} in {seconds:.0f} s", flush=True)
        for mode in args.modes:
            copy = work / f"resume{steps}-{mode}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run, copy)
            copy_config = work / f"resume{steps}-{mode}.yaml"
            copy_config.write_text(yaml.safe_dump(config | {"run_dir": str(copy)}))
            wall = launch(copy_config, "--resume", "--set", f"stop_at_step={steps + 1}", "--set",
                          f"data.resume={mode}", ranks=args.ranks)
            resume = json.loads((copy / "result.json").read_text())["resume"]
            rows.append({"step": steps, "mode": mode,
                         "seconds_to_first_step": round(resume["seconds_to_first_step"], 2),
                         "seconds_loading_checkpoint": round(resume["seconds_loading_checkpoint"], 2),
                         "job_wall_seconds": round(wall, 1)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(copy)
    report = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "cpu": cpu_name(), "ranks": args.ranks,
              "loader_workers_per_stream": args.workers, "token_budget": args.token_budget, "images": args.images,
              "command": "python benchmarks/resume_cost.py " + " ".join(sys.argv[1:]), "rows": rows}
    for mode in args.modes:
        times = {r["step"]: r["seconds_to_first_step"] for r in rows if r["mode"] == mode}
        if len(times) > 1:
            report[f"{mode}_ratio_last_to_first"] = round(times[max(times)] / times[min(times)], 2)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
