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
