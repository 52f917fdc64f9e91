"""Where a run keeps its checkpoints: tag folders ``stepNNNNNNNN``, the ``complete.json`` marker written
after every rank finished saving, ``latest``, and finding the newest complete one. Training writes and
resumes (:mod:`uniter_ds.train.checkpointing`), export reads (:mod:`uniter_ds.export`); both import this
module and neither imports the other.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "complete.json"
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a tag folder's name, None for anything else."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).exists()


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def find_resume_point(path: Path) -> Path | None:
    """``path`` is a checkpoint root (use its complete ``latest``, else its newest complete tag) or a
    tag folder (which must be complete). None: nothing to resume from."""
    if (path / MARKER).exists():
        return path
    if _TAG.match(path.name) and path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint is incomplete (no {MARKER}); it was interrupted while saving")
    latest = path / "latest"
    if latest.exists():
        candidate = path / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = complete_checkpoints(path)
    return complete[-1] if complete else None


# ---------------------------------------------------------------------------------------------
# One live job per run directory
# ---------------------------------------------------------------------------------------------

LOCK = ".lock"


class RunDirectoryBusy(RuntimeError):
    """A live job holds the run directory: a second one would write the same checkpoints and metrics."""


def lock_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock ("pid N on HOST since TIME") while a live process holds it; None when
    it is free. The lock is an flock: the kernel releases it when its holder dies, however it dies."""
    import fcntl

    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "a process that wrote nothing"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def lock_run_directory(run_dir: Path):  # -> an open file: the lock lives as long as it stays open
    """Take ``run_dir``'s lock for this process's lifetime, or raise :class:`RunDirectoryBusy` naming the
    holder."""
    import fcntl
    import os
    import socket
    import time

    f = open(Path(run_dir) / LOCK, "a+")  # noqa: SIM115 -- held open until the process ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise RunDirectoryBusy(f"{run_dir} is in use by a live job ({holder}): wait for it to end, stop it, or give "
                               f"this job another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f
