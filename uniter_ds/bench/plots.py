"""PNG plots next to a benchmark's JSON report (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plotting import pyplot


def _systems(run: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, run[name]) for name in ("ours", "baseline") if name in run]


def plot_training(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    """Throughput vs token budget, per-task step time, ours vs baseline."""
    plt = pyplot()
    stem = Path(json_path).with_suffix("")
    runs = report["runs"]
    title = (f"{report['settings']['preset']}, {report['settings']['precision']}, "
             f"ZeRO-{report['settings']['zero_stage']}, {report['environment']['device']}")
    written = []

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, marker in (("ours", "o"), ("baseline", "s")):
        points = [(run["token_budget"], run[name]) for run in runs if name in run]
        if points:
            budgets = [b for b, _ in points]
            left.plot(budgets, [r["samples_per_s"] for _, r in points], marker=marker, label=name)
            right.plot(budgets, [100 * (r["mfu"] or 0) for _, r in points], marker=marker, label=name)
    for axis, label in ((left, "samples/s per GPU"), (right, "MFU (%)")):
        axis.set_xscale("log", base=2)
        budgets = sorted({run["token_budget"] for run in runs})
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.minorticks_off()
        axis.set_xlabel("token budget per micro-batch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Throughput vs token budget ({title})")
    figure.tight_layout()
    written.append(stem.with_name(stem.name + "-throughput.png"))
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    run = runs[-1]
    systems = _systems(run)
    tasks = sorted({task for _, r in systems for task in r["per_task_step_time_s"]})
    figure, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(systems)
    for i, (name, result) in enumerate(systems):
        axis.bar([t + i * width for t in range(len(tasks))],
                 [result["per_task_step_time_s"].get(task, 0.0) for task in tasks], width, label=name)
    axis.set_xticks([t + width * (len(systems) - 1) / 2 for t in range(len(tasks))], tasks)
    axis.set_ylabel("median step time (s)")
    axis.set_title(f"Per-task step time, token budget {run['token_budget']}\n{title}", fontsize=9)
    axis.legend()
    figure.tight_layout()
    written.append(stem.with_name(stem.name + "-per-task.png"))
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    if any("baseline" in r for r in runs):
        figure, axis = plt.subplots(figsize=(6, 4))
        compared = [r for r in runs if "baseline" in r]
        positions = range(len(compared))
        axis.bar([p - 0.2 for p in positions], [r["ours"]["samples_per_s"] for r in compared], 0.4, label="ours")
        axis.bar([p + 0.2 for p in positions], [r["baseline"]["samples_per_s"] for r in compared], 0.4,
                 label="baseline")
        for p, r in zip(positions, compared):
            axis.annotate(f"{r['speedup_samples_per_s']:.2f}x", (p, max(r["ours"]["samples_per_s"],
                                                                         r["baseline"]["samples_per_s"])),
                          ha="center", va="bottom")
        axis.set_xticks(list(positions), [str(r["token_budget"]) for r in compared])
        axis.set_xlabel("token budget per micro-batch")
        axis.set_ylabel("samples/s per GPU")
        axis.set_title(f"Ours vs baseline\n{title}", fontsize=9)
        axis.legend()
        figure.tight_layout()
        written.append(stem.with_name(stem.name + "-vs-baseline.png"))
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written


def plot_memory(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    plt = pyplot()
    probes = sorted(report["probes"], key=lambda p: p["token_budget"])
    figure, axis = plt.subplots(figsize=(6, 4))
    measured = [p for p in probes if p["peak_gb"] is not None]
    axis.plot([p["token_budget"] for p in measured], [p["peak_gb"] for p in measured], marker="o",
              label=report["measured"])
    for p in probes:
        if p["peak_gb"] is None:
            axis.axvline(p["token_budget"], color="red", linestyle=":", label="out of memory")
    if report["limit_gb"]:
        axis.axhline(report["limit_gb"], color="gray", linestyle="--", label=f"limit {report['limit_gb']:g} GB")
    if report["largest_token_budget"]:
        axis.axvline(report["largest_token_budget"], color="green", label=f"largest: {report['largest_token_budget']}")
    axis.set_xlabel("token budget per micro-batch")
    axis.set_ylabel("peak memory (GB)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(json_path).with_suffix(".png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]


def plot_data(report: dict[str, Any], json_path: str | Path) -> list[Path]:
    plt = pyplot()
    rows = report["rows"]
    labels = sorted({(r["regions"], r["task"]) for r in rows}, key=lambda x: (x[0], x[1]))
    series = sorted({(r["workers"], r.get("via", "local")) for r in rows})
    figure, axis = plt.subplots(figsize=(max(6, len(labels) * 0.6), 4))
    width = 0.8 / len(series)
    for i, (count, via) in enumerate(series):
        values = {(r["regions"], r["task"]): r["samples_per_s"] for r in rows
                  if (r["workers"], r.get("via", "local")) == (count, via)}
        axis.bar([x + i * width for x in range(len(labels))], [values.get(label, 0) for label in labels], width,
                 label=("in-process" if count == 0 else f"{count} worker(s)") + ("" if via == "local" else f", {via}"))
    axis.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))],
                    [f"{regions}\n{task}" for regions, task in labels], fontsize=7)
    axis.set_ylabel("samples/s")
    axis.set_title(f"Data loader, token budget {report['token_budget']} ({report['machine']})", fontsize=9)
    axis.legend()
    figure.tight_layout()
    path = Path(json_path).with_suffix(".png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]
