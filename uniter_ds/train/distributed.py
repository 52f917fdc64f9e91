"""This process's place in the job: its rank, the world, and its device.

The ``deepspeed`` launcher starts one process per GPU and gives every one of them all the GPUs of
its node plus ``LOCAL_RANK``. Until a process selects its GPU, ``cuda`` means the first GPU on every
rank, so :func:`rank_device` runs first in every entry point (pretraining, evaluation, bench), before
a model, a tensor or a CUDA context is made, and everything after it uses the device it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("uniter_ds.pretrain")

# After this many seconds a rank still waiting at start-up says what for (UNITER_DS_WAIT_NOTICE_S).
WAIT_NOTICE_S = 30.0


@contextlib.contextmanager
def say_while_waiting(what: str) -> Iterator[None]:
    """Log "still waiting for <what>" if the block takes longer than ``UNITER_DS_WAIT_NOTICE_S`` seconds
    (default 30), and again every minute: a start-up that hangs (a rank that never joins, a build lock)
    says where instead of nothing."""
    first = float(os.environ.get("UNITER_DS_WAIT_NOTICE_S", WAIT_NOTICE_S))
    done, started = threading.Event(), time.monotonic()

    def watch() -> None:
        wait = first
        while not done.wait(wait):
            logger.warning("rank %s: still waiting for %s (%.0f s)", os.environ.get("RANK", "0"), what,
                           time.monotonic() - started)
            wait = 60.0

    threading.Thread(target=watch, name="wait-notice", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={value!r}: expected a non-negative integer") from None
    if rank < 0:
        raise ValueError(f"LOCAL_RANK={value!r}: expected a non-negative integer")
    return rank


def rank_device() -> torch.device:
    """Select this rank's accelerator (``LOCAL_RANK``) as the current device and return it; CPU ranks
    get ``cpu``. Safe to call again: it selects the same device."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    index = local_rank()
    if index >= accelerator.device_count():
        raise RuntimeError(f"LOCAL_RANK={index}, but this node has {accelerator.device_count()} "
                           f"{accelerator.device_name()} device(s)")
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under the deepspeed launcher its environment is used; started
    alone, a world of one. The device is selected before the process group exists (NCCL binds a
    communicator to the current device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and not dist.is_initialized():
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500),
                           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            os.environ.setdefault(key, value)
    device = rank_device()
    if not dist.is_initialized():
        world = os.environ.get("WORLD_SIZE", "1")
        with say_while_waiting(f"the {world} ranks of the job to join at {os.environ.get('MASTER_ADDR')}:"
                               f"{os.environ.get('MASTER_PORT')} (a rank or node that did not start, or another "
                               f"MASTER_ADDR/port on it)"):
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        if device.type == "cpu":
            unlink_shared_memory_buffer()
    return dist.get_rank(), dist.get_world_size(), device


def shared_memory_buffer(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for ``rank`` of the job at MASTER_ADDR:PORT
    (ops/csrc/cpu/comm/shm.cpp names it so when all ranks share one node)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shared_memory_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps one 64 MiB file per rank in /dev/shm and never unlinks it, so every
    job left world x 64 MiB of RAM behind, under a new name per port: a test suite taking a free port per
    launch filled a 24 GB machine and its ranks died. Once every rank has mapped its peers' files (they
    do so inside init_distributed; the barrier waits for all), each rank unlinks its own name; the
    mappings stay valid until the processes end."""
    if dist.get_world_size() > 1:
        dist.barrier()
    shared_memory_buffer(dist.get_rank()).unlink(missing_ok=True)
