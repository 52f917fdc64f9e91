"""Which (dataset, task) each optimizer step (or micro-batch) trains on.

The draw is a pure function of (seed, step, micro-batch index): every rank computes the same task
without communicating, a run is reproducible from its seed, and resuming needs only the step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Stream:
    dataset: str
    task: str

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.task}"


class TaskScheduler:
    def __init__(self, mix: dict[Stream, float], seed: int, per_micro_batch: bool = False):
        if not mix or any(w <= 0 for w in mix.values()):
            raise ValueError(f"mix ratios must be positive, got {mix}")
        self.streams = list(mix)
        self.weights = [float(mix[s]) for s in self.streams]
        self.seed, self.per_micro_batch = seed, per_micro_batch

    def draw(self, step: int, micro_batch: int = 0) -> Stream:
        index = micro_batch if self.per_micro_batch else 0
        rng = random.Random(f"uniter-ds-task-{self.seed}-{step}-{index}")
        return rng.choices(self.streams, weights=self.weights)[0]

    def for_step(self, step: int, micro_batches: int) -> list[Stream]:
        return [self.draw(step, k) for k in range(micro_batches)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "per_micro_batch": self.per_micro_batch,
                "mix": [[s.dataset, s.task, w] for s, w in zip(self.streams, self.weights)]}

    def check_state(self, state: dict) -> None:
        """A resumed run must draw the same tasks: refuse a checkpoint made with another mix or seed."""
        if state != self.state_dict():
            raise ValueError(f"task schedule differs from the checkpoint's: {state} vs {self.state_dict()}")
