"""Where and with what a number or a run was made: code version, package versions, the device.

Used by the benchmark reports and by the training run's MLflow tags. Every function is best-effort and
never raises: a report or a run is not worth losing to a missing ``git`` binary or ``/proc/cpuinfo``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of ``keys`` (None without one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags", "Features") or "").split())


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes bf16 matmuls natively (x86: AVX512-BF16 or AMX-BF16; Arm: BF16).
    Without it PyTorch emulates bf16 and a layer runs ~25x slower than in fp32 (measured on AVX2)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_name() -> str:
    return f"{_cpuinfo('model name') or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``) or the CPU's model and core count."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001
        pass
    return cpu_name()


def package_versions() -> dict[str, str]:
    """torch, its CUDA, deepspeed, transformers, mlflow, python."""
    versions = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "python": platform.python_version()}
    for package in ("deepspeed", "transformers", "mlflow"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - a version string is not worth a lost report
            versions[package] = "unavailable"
    return versions


def _git(*args: str, where: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit(where: Path | None = None) -> str:
    """The checkout's commit: ``git`` when there is one, else read from ``.git`` directly (the GPU
    machines have no git binary, and a copy of the tree may have no .git: there the caller can say it
    in ``UNITER_DS_GIT_COMMIT``); "unknown" when nothing works."""
    if os.environ.get("UNITER_DS_GIT_COMMIT"):
        return os.environ["UNITER_DS_GIT_COMMIT"]
    where = where or _HERE
    head = _git("rev-parse", "--short", "HEAD", where=where)
    if head and head.strip():
        return head.strip()
    try:
        root = next(p for p in (where, *where.parents) if (p / ".git").exists())
        git = root / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:7]  # detached
        ref = head[4:].strip()
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").exists() else git
        for folder in dict.fromkeys((git, common)):
            if (folder / ref).exists():
                return (folder / ref).read_text().strip()[:7]
            if (folder / "packed-refs").exists():
                for line in (folder / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0][:7]
    except (OSError, StopIteration):
        pass
    return "unknown"


def git_dirty(where: Path | None = None) -> bool | None:
    """Whether tracked files differ from the commit (``git status --porcelain --untracked-files=no``);
    None when git cannot tell (no binary, no checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no", where=where or _HERE)
    return None if status is None else bool(status.strip())
