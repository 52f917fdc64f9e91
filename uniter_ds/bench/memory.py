"""The largest token budget per micro-batch that fits: a search over real training steps.

Each probe is a fresh ``uniter-ds bench train`` process (so one out-of-memory probe cannot poison the
next, and the host's peak RSS is per probe) running one optimizer step of every task at that budget.
It fits when the process succeeds and its peak memory stays under the limit: on a GPU the device's
peak allocation against the card's memory (an out-of-memory error is a "does not fit"), on the CPU
the process's peak RSS against ``--limit-gb``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# What an allocation failure says, in a process's output or an exception's message (cuBLAS and cuDNN
# report theirs as their own errors).
OUT_OF_MEMORY = ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "cudaErrorMemoryAllocation", "Cannot allocate memory")


@dataclass
class Probe:
    token_budget: int
    fits: bool
    peak_gb: float | None
    reason: str
    actual_tokens: float | None = None  # mean tokens per micro-batch actually run (padding included)


def search_largest(probe: Callable[[int], Probe], start: int, maximum: int, resolution: int
                   ) -> tuple[int | None, list[Probe]]:
    """Largest budget in [resolution, maximum] (a multiple of ``resolution`` once bisecting) for which
    ``probe`` fits, assuming memory grows with the budget: double (or halve) from ``start`` to bracket
    the limit, then bisect. Returns (budget or None when nothing fits, every probe in order)."""
    if not 0 < resolution <= start <= maximum:
        raise ValueError(f"memory search: need 0 < resolution ({resolution}) <= start ({start}) <= max ({maximum})")
    probes: list[Probe] = []

    def fits(budget: int) -> bool:
        probes.append(probe(budget))
        return probes[-1].fits

    if fits(start):
        low, high = start, None
        while high is None and low * 2 <= maximum:
            if fits(low * 2):
                low *= 2
            else:
                high = low * 2
        if high is None:  # every doubling fitted: the maximum decides
            if low == maximum or fits(maximum):
                return maximum, probes
            high = maximum
    else:
        low, high = None, start
        while low is None and high // 2 >= resolution:
            if fits(high // 2):
                low = high // 2
            else:
                high //= 2
        if low is None:
            return None, probes
    return _bisect(fits, low, high, resolution, probes)


def _bisect(fits: Callable[[int], bool], low: int, high: int, resolution: int, probes: list[Probe]
            ) -> tuple[int, list[Probe]]:
    while high - low > resolution:
        middle = low + max(resolution, (high - low) // 2 // resolution * resolution)
        if middle >= high:
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, probes


def subprocess_probe(train_args: list[str], limit_gb: float | None, on_gpu: bool, workdir: str | Path | None = None,
                     log: Callable[[str], None] = print) -> Callable[[int], Probe]:
    """A probe running ``uniter-ds bench train <train_args> --token-budget B`` in a fresh process."""
    folder = Path(workdir or tempfile.mkdtemp(prefix="uniter-ds-memory-"))
    folder.mkdir(parents=True, exist_ok=True)

    def probe(budget: int) -> Probe:
        out = folder / f"probe-{budget}.json"
        command = [sys.executable, "-m", "uniter_ds.cli", "bench", "train", *train_args, "--token-budget", str(budget),
                   "--out", str(out), "--no-plots"]
        result = subprocess.run(command, capture_output=True, text=True)
        text = result.stdout + result.stderr
        if result.returncode != 0:
            if any(marker in text for marker in OUT_OF_MEMORY):
                found = Probe(budget, False, None, "out of memory")
            else:
                raise RuntimeError(f"memory probe at token budget {budget} failed (exit {result.returncode}), "
                                   f"not for lack of memory:\n{text[-3000:]}")
        else:
            ours = json.loads(out.read_text())["runs"][0]["ours"]
            if ours.get("status", "ok") != "ok":
                found = Probe(budget, False, None, ours["status"])
            else:
                memory = ours["memory"]
                peak = memory["device_peak_gb"] if on_gpu else memory["host_peak_rss_gb"]
                fits = limit_gb is None or peak <= limit_gb
                what = "device peak" if on_gpu else "host peak RSS"
                tokens = ours["mean_padded_tokens_per_micro_batch"]
                found = Probe(budget, fits, peak, f"{what} {peak:.2f} GB" + (
                    "" if limit_gb is None else f" {'<=' if fits else '>'} {limit_gb:g} GB")
                    + f"; {tokens:.0f} tokens per micro-batch run", tokens)
        log(f"token budget {budget:>7}: {'fits' if found.fits else 'does not fit'} ({found.reason})")
        return found

    return probe


def memory_report(largest: int | None, probes: list[Probe], limit_gb: float | None, what: str) -> dict[str, Any]:
    actual = next((p.actual_tokens for p in probes if p.token_budget == largest and p.fits), None)
    return {"largest_token_budget": largest, "largest_actual_tokens_per_micro_batch": actual,
            "limit_gb": limit_gb, "measured": what,
            "probes": [asdict(p) for p in probes]}
