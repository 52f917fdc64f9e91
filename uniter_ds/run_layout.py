"""Where a run keeps its checkpoints: tag folders ``stepNNNNNNNN``, the ``complete.json`` marker written
after every rank finished saving, ``latest``, and finding the newest complete one. Training writes and
resumes (:mod:`uniter_ds.train.checkpointing`), export reads (:mod:`uniter_ds.export`); both import this
module and neither imports the other.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

MARKER = "complete.json"
_TAG = re.compile(r"^step(\d+)$")
logger = logging.getLogger("uniter_ds.checkpoints")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a tag folder's name, None for anything else."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).exists()


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file of a checkpoint folder and its size, as ``complete.json`` records them."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def damage(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (missing, or not the size ``complete.json``
    recorded when every rank had written them), or None. Checkpoints whose marker lists no files
    (written before the list existed) cannot be checked and pass."""
    recorded = json.loads((folder / MARKER).read_text()).get("files")
    if recorded is None:
        return None
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is {path.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def find_resume_point(path: Path) -> Path | None:
    """``path`` is a checkpoint root (its newest complete, undamaged checkpoint: ``latest`` when that is
    one; a damaged one is passed over with a warning naming the file) or a tag folder (which must be
    complete and undamaged). None: nothing to resume from."""
    if (path / MARKER).exists():
        problem = damage(path)
        if problem:
            raise FileNotFoundError(f"{path}: checkpoint is damaged: {problem}")
        return path
    if _TAG.match(path.name) and path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint is incomplete (no {MARKER}); it was interrupted while saving")
    # ``latest`` first: it names this run's newest even where an earlier run in the same directory left
    # checkpoints at later steps; then the complete ones, newest first.
    latest = path / "latest"
    named = [path / latest.read_text().strip()] if latest.exists() else []
    candidates = [c for c in named if is_complete(c)] + list(reversed(complete_checkpoints(path)))
    for candidate in dict.fromkeys(candidates):
        problem = damage(candidate)
        if problem is None:
            return candidate
        logger.warning("checkpoint %s is damaged (%s): taking the previous complete one", candidate, problem)
    return None


def passed_over(root: Path, chosen: Path | None) -> list[str]:
    """Why each tag folder under ``root`` newer than ``chosen`` (all, when None) was not taken:
    incomplete, damaged, or not the one ``latest`` names."""
    reasons = []
    after = step_of(chosen.name) if chosen is not None else -1
    for folder in sorted(root.iterdir(), key=lambda p: step_of(p.name) or -1) if root.is_dir() else []:
        step = step_of(folder.name)
        if step is None or not folder.is_dir() or step <= after:
            continue
        if not is_complete(folder):
            reasons.append(f"{folder.name}: incomplete (no {MARKER}: interrupted while saving)")
        else:
            reasons.append(f"{folder.name}: {damage(folder) or 'complete, but latest names ' + str(chosen)}")
    return reasons


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
