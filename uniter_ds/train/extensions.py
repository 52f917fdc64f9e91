"""DeepSpeed's JIT-compiled ops: built ahead (``uniter-ds prebuild``) in the environment's own folder,
and checked before a job starts.

DeepSpeed compiles some ops the first time a process needs them: on CPU ranks its shared-memory
communication op (about a minute), on GPUs FusedAdam when ``optim.implementation: deepspeed``. torch
guards each build with a ``lock`` file in the extensions folder, held open by the building process. A
build killed midway leaves the file behind, and every later process that needs the op waits for it
forever, silently. So: each environment builds into its own folder (``<env>/torch-extensions``, unless
``TORCH_EXTENSIONS_DIR`` says otherwise; one shared folder is rewritten by every environment that
builds with another compiler or torch), ``uniter-ds prebuild`` builds ahead, and ``uniter-ds pretrain``
refuses to start beside a lock whose builder is gone, naming the command that clears it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def extensions_dir() -> Path:
    """Where this environment's JIT-built ops live: ``TORCH_EXTENSIONS_DIR`` or ``<sys.prefix>/torch-extensions``."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch-extensions")


def lock_holders(lock: Path) -> list[int]:
    """The processes that hold ``lock`` open (a live build holds its lock file open until it ends)."""
    target = str(lock.resolve())
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return holders


def stale_locks(folder: Path | None = None) -> list[Path]:
    """Build locks in the extensions folder that no live process holds: left by a build that was killed.
    (Linux: the holders are read from /proc; elsewhere nothing is reported.)"""
    folder = folder or extensions_dir()
    if not Path("/proc/self/fd").is_dir() or not folder.is_dir():
        return []
    return [lock for lock in sorted(folder.glob("*/lock")) if not lock_holders(lock)]


def prebuild(on_gpu: bool) -> list[str]:
    """Build the ops this machine's jobs need into :func:`extensions_dir` (at once when built already)."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stale = stale_locks()
    if stale:
        raise RuntimeError(stale_message(stale))
    from deepspeed.accelerator import get_accelerator

    names = ["FusedAdamBuilder"] if on_gpu else ["ShareMemCommBuilder"]
    built = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            continue
        builder.load(verbose=False)
        built.append(builder.NAME)
    return built


def stale_message(locks: list[Path]) -> str:
    return (f"{', '.join(map(str, locks))}: a DeepSpeed op build was interrupted here and left its lock (no process "
            f"on this machine holds it open); every "
            f"job that needs the op would wait for it forever. Clear it with: rm {' '.join(map(str, locks))} "
            f"(then `uniter-ds prebuild` builds the op again)")
