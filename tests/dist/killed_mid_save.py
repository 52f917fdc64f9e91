"""A pretraining rank that kill -9s itself in the middle of one checkpoint, for tests/test_faults.py.

Run under the deepspeed launcher in place of ``uniter_ds.train.pretrain`` (same arguments). The rank named
by ``KILL_MID_SAVE_RANK`` sends itself SIGKILL right after it has written its first file of the checkpoint
tag ``KILL_MID_SAVE_TAG``: DeepSpeed's files are half there and no ``complete.json`` is. A kill sent from
outside the moment the folder appears raced the save (a tiny model's takes tens of milliseconds) and on a
loaded machine often landed after it; this lands in the same place every time.
"""

from __future__ import annotations

import os
import runpy
import signal
from pathlib import Path

import torch

_save = torch.save


def _save_then_die(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == os.environ["KILL_MID_SAVE_TAG"]:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if os.environ.get("RANK") == os.environ["KILL_MID_SAVE_RANK"]:
        torch.save = _save_then_die  # DeepSpeed's checkpoint engine and checkpointing.py both call torch.save
    runpy.run_module("uniter_ds.train.pretrain", run_name="__main__", alter_sys=True)
