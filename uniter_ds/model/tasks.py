"""The pretraining tasks' names and the groups the code asks about: the one place they are spelled.

Plain Python (no torch): the experiment config and the command line read it without loading a model.
"""

from __future__ import annotations

TASKS = ("mlm", "mrfr", "mrc", "mrc-kl", "itm")
# Masked region modelling: a region is masked and the encoder's state at it predicts it.
REGION_TASKS = ("mrfr", "mrc", "mrc-kl")
# Their targets are the detector's class distributions (a dataset's soft labels).
SOFT_LABEL_TASKS = ("mrc", "mrc-kl")
# A prediction per item that is right or wrong: these report an accuracy.
ACCURACY_TASKS = ("mlm", "mrc", "mrc-kl", "itm")
# The paper's pretraining mix (its best row: MLM + ITM + MRC-kl + MRFR, plus WRA on ITM batches).
PAPER_MIX = {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2}
DEFAULT_BENCH_TASKS = ("mlm", "itm", "mrfr", "mrc-kl")


def check_task(task: str) -> str:
    """``task`` if it is a pretraining task, else a ValueError naming the choices."""
    if task not in TASKS:
        raise ValueError(f"unknown pretraining task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def needs_soft_labels(tasks: object) -> bool:
    """Whether any of ``tasks`` (names, or a mapping keyed by them) trains on soft labels."""
    return any(task in SOFT_LABEL_TASKS for task in tasks)  # type: ignore[attr-defined]
