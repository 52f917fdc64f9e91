"""Where a GPU step waits for the host: the code location of every synchronising CUDA call.

CUDA's sync debug mode in "warn" mode reports each synchronising call without stopping the work, so
one pass lists them all. Used by ``benchmarks/gpu_syncs.py`` (a report per ZeRO stage and task) and
``tests/test_gpu.py`` (none from our code).
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def recorded_syncs() -> Iterator[list[traceback.FrameSummary]]:
    """Yields a list that fills with the innermost frame outside torch of every host synchronisation
    made inside the block (the line that asked for it). Without CUDA nothing is recorded."""
    sites: list[traceback.FrameSummary] = []
    if not torch.cuda.is_available():
        yield sites
        return

    def record(message, *args, **kwargs) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return  # e.g. the "prototype feature" notice the first set_sync_debug_mode call prints
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "warnings.py" not in f.filename]
        if frames:
            sites.append(frames[-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
