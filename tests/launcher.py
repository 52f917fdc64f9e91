"""Start the real ``deepspeed`` launcher with CPU ranks from the tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from uniter_ds.train.extensions import extensions_dir
from uniter_ds.train.launch import deepspeed_executable, free_port  # noqa: F401 -- the tests' port

ROOT = Path(__file__).resolve().parents[1]


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))  # the environment's own, as uniter-ds pretrain
    return env


def one_rank_env() -> dict[str, str]:
    """:func:`cpu_env` for a script that starts a DeepSpeed engine itself, as rank 0 of 1."""
    return cpu_env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}


def deepspeed_bin() -> str:
    return deepspeed_executable()


def run_launcher(args: list[str], timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([deepspeed_bin(), *args], cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"deepspeed {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
