"""DeepSpeed checkpoints that are safe to resume from.

``engine.save_checkpoint`` writes ``ROOT/TAG/``; this module adds, after every rank has finished
writing, a ``complete.json`` marker in the tag folder and then replaces ``ROOT/latest`` atomically
(write + rename). A run killed while saving leaves a tag without the marker, which resume ignores,
and ``latest`` still names the previous complete checkpoint. Older checkpoints beyond ``keep_last``
are removed after the new one is complete (never the new one, even where an earlier run in the same
directory left checkpoints at later steps).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint_files import guard_deepspeed_loads, load_pt
from ..run_layout import (
    MARKER,
    complete_checkpoints,
    file_sizes,
    find_resume_point,
    is_complete,
    step_of,
    tag_for,
)

if TYPE_CHECKING:
    from .config import ExperimentConfig
    from .feed import DataFeed
    from .scheduler import TaskScheduler

logger = logging.getLogger("uniter_ds.pretrain")

__all__ = ["MARKER", "complete_checkpoints", "find_resume_point", "is_complete", "load", "rng_state", "save",
           "set_rng_state", "tag_for", "Start", "resume_from", "save_run"]

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _oldest_first(checkpoints: list[Path], new: Path, step: int) -> list[Path]:
    """Retention order, the new checkpoint last: a run started afresh in a used run directory finds
    the earlier run's checkpoints there, some at later steps than its own; they are older than
    anything this run writes, and must never outrank (and so delete) the checkpoint just saved."""
    earlier_run = [c for c in checkpoints if c != new and step_of(c.name) > step]
    this_run = [c for c in checkpoints if c != new and step_of(c.name) <= step]
    return earlier_run + this_run + [new]


class DiskFull(OSError):
    """A checkpoint could not be written for want of space; the previous complete one is intact."""


FULL_BELOW_BYTES = 64 * 2**20  # a save that failed with less free space than this ran out of it


def _explained(error: BaseException, root: Path, folder: Path) -> BaseException:
    """torch's writer reports a full disk as ``basic_ios::clear: iostream error`` or ``unexpected pos``;
    say what it is, and what is still there to resume from."""
    free = shutil.disk_usage(root).free if root.exists() else None
    if getattr(error, "errno", None) != errno.ENOSPC and (free is None or free >= FULL_BELOW_BYTES):
        return error
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    shutil.rmtree(folder, ignore_errors=True)  # the half-written checkpoint: space back, nothing to mistake
    return DiskFull(errno.ENOSPC, f"no space left on device while saving {folder} ({free} bytes free; "
                    f"{type(error).__name__}: {error}); the run stops, "
                    + (f"{root / latest} (latest) is intact to resume from" if latest else "no checkpoint yet"))


def save(engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int,
         rank_state: dict[str, Any] | None = None) -> Path:
    """Every rank writes its part, then rank 0 marks the checkpoint complete. ``client_state``: DeepSpeed
    keeps rank 0's; ``rank_state``: each rank's own (its data places), in ``rank{r}_state.pt``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    folder = root / tag
    if rank == 0 and folder.exists():  # a leftover of an interrupted save at this step
        shutil.rmtree(folder)
    _barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
        if rank_state is not None:
            torch.save(rank_state, folder / f"rank{rank}_state.pt")
    except (RuntimeError, OSError) as error:
        raise _explained(error, root, folder) from error
    _barrier()
    if rank == 0:
        # The files and their sizes, once every rank has written: resume and export check them.
        _write_atomic(folder / MARKER, json.dumps({"step": step, "world_size": dist.get_world_size()
                                                   if dist.is_initialized() else 1, "files": file_sizes(folder)}))
        _write_atomic(root / "latest", tag)
        for old in _oldest_first(complete_checkpoints(root), folder, step)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.iterdir():  # incomplete tags older than the new checkpoint
            stale_step = step_of(stale.name)
            if stale_step is not None and stale.is_dir() and stale_step < step and not is_complete(stale):
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return folder


def load(engine, folder: Path) -> dict[str, Any]:
    """Load model, optimizer, LR schedule and this rank's RNG; return the client state, with this rank's
    own state under ``"rank"`` where the checkpoint has it."""
    guard_deepspeed_loads(engine)  # DeepSpeed's own reads would unpickle whatever the files name
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint to load")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(load_pt(rng_file))
    own = folder / f"rank{rank}_state.pt"
    if own.exists():
        client_state = client_state | {"rank": load_pt(own)}
    return client_state


# ---------------------------------------------------------------------------------------------
# A pretraining run's checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class Start:
    """Where the run starts: the step, this rank's data state (None: from scratch), and for a resumed run
    the times the resume took."""

    step: int = 0
    data_state: dict[str, Any] | None = None
    clock: dict[str, float] = field(default_factory=dict)

    def first_step_done(self, step: int, rank: int) -> None:
        if not self.clock or "first_step" in self.clock:
            return
        self.clock["first_step"] = time.perf_counter()
        if rank == 0:
            logger.info("resumed: step %d done %.1f s after the checkpoint began to load (%.1f s loading it, "
                        "%.1f s restoring the data streams and making the step)", step,
                        self.clock["first_step"] - self.clock["began"], self.clock["loaded"] - self.clock["began"],
                        self.clock["first_step"] - self.clock["loaded"])


def resume_from(engine: Any, scheduler: TaskScheduler, checkpoint_root: Path, resume: str | None, rank: int) -> Start:
    """``--resume`` (the latest complete checkpoint, or PATH): the engine, optimizer and RNG restored, the
    task schedule checked; without it, step 0 (with a warning over an earlier run's checkpoints)."""
    if resume not in (None, "latest") and not Path(resume).exists():
        raise FileNotFoundError(f"--resume {resume}: does not exist")
    if resume is None:
        if rank == 0 and (earlier := complete_checkpoints(checkpoint_root)):
            logger.warning("starting from step 0 in %s, which holds an earlier run's checkpoints (%s): this run's "
                           "checkpoints replace them under checkpoint.keep_last; --resume continues that run "
                           "instead", checkpoint_root.parent, ", ".join(p.name for p in earlier))
        return Start()
    point = find_resume_point(checkpoint_root if resume == "latest" else Path(resume))
    if point is None:
        if rank == 0:
            logger.info("no complete checkpoint under %s: starting from step 0", checkpoint_root)
        return Start()
    began = time.perf_counter()
    client = load(engine, point)
    scheduler.check_state(client["scheduler"])
    if rank == 0:
        logger.info("resumed from %s at step %d", point, client["step"])
    return Start(client["step"], client.get("rank", {}).get("data", client["data"]),
                 {"began": began, "loaded": time.perf_counter()})


def save_run(engine: Any, config: ExperimentConfig, scheduler: TaskScheduler, feed: DataFeed, step: int) -> Path:
    """A complete checkpoint of every rank (checkpointing.py: a crash never leaves a half-written one)."""
    client = {"step": step, "scheduler": scheduler.state_dict(), "data": feed.state_dict(workers=False),
              "config": config.to_dict()}
    return save(engine, Path(config.run_dir) / "checkpoints", step, client, config.checkpoint.keep_last,
                              rank_state={"data": feed.state_dict()})
