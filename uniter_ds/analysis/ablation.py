"""The paper's ablations in miniature: a grid of pretraining settings, the same probes for each.

Every arm pretrains from one base experiment config (``uniter-ds pretrain``, the real launcher) for the
same number of steps and each seed, then its export is probed (:mod:`.probes`) and its held-out
pretraining metrics are collected. The arm ``none`` is the paper's L1: no pretraining, the probes on a
randomly initialised encoder. Output: ``ablation.json``, ``ablation.md`` (mean +- std over seeds,
Meta-Sum) and ``ablation.png``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..export import load_encoder
from ..model import UniterModel
from ..model.tasks import PAPER_MIX
from ..train.config import ExperimentConfig, load_config
from .probes import PROBES, extract, probe_pairs, run_probes


@dataclass
class Arm:
    name: str
    tasks: dict[str, int] = field(default_factory=dict)  # empty: no pretraining
    masking: str = "conditional"
    wra_weight: float = 0.0
    paper_row: str = ""  # the row of the paper's ablation table it mirrors


ARMS = [
    Arm("none", paper_row="L1 (no pretraining)"),
    Arm("mlm", {"mlm": 1}, paper_row="L5"),
    Arm("itm", {"itm": 1}, paper_row="L4"),
    Arm("mlm+itm", {"mlm": 1, "itm": 1}, paper_row="L6"),
    Arm("mlm+itm+mrc-kl+mrfr", dict(PAPER_MIX), paper_row="~L10"),
    Arm("mlm+itm+mrc-kl+mrfr+wra", dict(PAPER_MIX), wra_weight=0.1, paper_row="L11"),
    Arm("mlm+itm+mrc-kl+mrfr+wra, joint masking", dict(PAPER_MIX), masking="joint", wra_weight=0.1,
        paper_row="L12 vs L11"),
]
ZERO_SHOT = {"ITM acc": "val/itm/acc", "MLM acc": "val/mlm/acc", "MRC-kl acc": "val/mrc-kl/acc",
             "R@1 t2i": "val/retrieval/text_to_image_r1"}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def pretrain_arm(arm: Arm, seed: int, base_config: str, run_dir: Path, steps: int, num_gpus: int,
                 extra: list[str]) -> dict[str, Any]:
    """``uniter-ds pretrain`` for one arm and seed (skipped when its result.json is already there)."""
    result_file = run_dir / "result.json"
    if not result_file.exists():
        tasks = "{" + ", ".join(f"{task}: {weight}" for task, weight in arm.tasks.items()) + "}"
        command = [sys.executable, "-m", "uniter_ds.cli", "pretrain", "--config", base_config,
                   "--num-gpus", str(num_gpus), "--set", f"run_dir={run_dir}", "--set", f"seed={seed}",
                   "--set", f"data.train.0.tasks={tasks}", "--set", f"data.masking={arm.masking}",
                   "--set", f"model.wra_weight={arm.wra_weight}", "--set", f"stop_at_step={steps}",
                   "--set", f"checkpoint.every={steps}", "--set", "eval.every=0", "--set", "export_at_end=true"]
        for assignment in extra:
            command += ["--set", assignment]
        log = run_dir.parent / f"{run_dir.name}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"ablation arm {arm.name!r} seed {seed}: pretraining failed (exit {code}); see {log}")
    return json.loads(result_file.read_text())


def starting_point(experiment: ExperimentConfig, seed: int, folder: Path) -> UniterModel:
    """The arm without pretraining: the weights every arm starts from (random with this seed, or the
    config's ``model.init_from``), saved and reloaded as an export would be."""
    from ..train.engine import build_model

    torch.manual_seed(seed)
    build_model(experiment).uniter.save_pretrained(folder)
    return UniterModel.from_pretrained(folder)


def run_grid(base_config: str, out: str | Path, *, arms: list[Arm], seeds: list[int], steps: int,
             probe_train_images: int = 600, probe_test_images: int = 300, probe_steps: int = 300, num_gpus: int = 2,
             extra: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    out = Path(out)
    experiment = load_config(base_config, list(extra or []))  # a bad key fails here, before any run
    train_folder = experiment.data.train[0].paths[0]
    if not experiment.data.val:
        raise ValueError(f"{base_config}: the ablation needs held-out data (config key 'data.val')")
    probe_train = probe_pairs(train_folder, probe_train_images)
    probe_test = probe_pairs(experiment.data.val[0], probe_test_images)
    num_classes = 1 + max(c for pair in probe_train + probe_test for c in pair.image.extra["classes"])
    rows = []
    started = time.time()
    for arm in arms:
        for seed in seeds:
            run_dir = out / _slug(arm.name) / f"seed{seed}"
            arm_start = time.time()
            if arm.tasks:
                result = pretrain_arm(arm, seed, base_config, run_dir, steps, num_gpus, list(extra or []))
                encoder = load_encoder(run_dir)
                held_out = result["eval"]
            else:
                encoder = starting_point(experiment, seed, run_dir / "export" / "hf")
                held_out = {}
            scores = run_probes(extract(encoder, probe_train, num_classes, seed=seed),
                                extract(encoder, probe_test, num_classes, seed=seed + 1), steps=probe_steps, seed=seed)
            rows.append({"arm": arm.name, "seed": seed, "probes": scores, "held_out": held_out,
                         "seconds": round(time.time() - arm_start, 1)})
            log(f"{arm.name:<42} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) +
                f" ({rows[-1]['seconds']:.0f} s)")
    report = {"base_config": base_config, "steps": steps, "seeds": seeds, "arms": [asdict(a) for a in arms],
              "probe_images": {"train": len(probe_train), "test": len(probe_test)}, "probe_steps": probe_steps,
              "overrides": list(extra or []), "seconds": round(time.time() - started, 1), "rows": rows,
              "summary": summarize(rows, arms), "date": time.strftime("%Y-%m-%d")}
    return report


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(rows: list[dict[str, Any]], arms: list[Arm]) -> list[dict[str, Any]]:
    summary = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm.name]
        if not mine:
            continue
        entry: dict[str, Any] = {"arm": arm.name, "paper_row": arm.paper_row}
        for key in (*PROBES, "meta_sum"):
            entry[key] = _mean_std([r["probes"][key] for r in mine])
        for label, key in ZERO_SHOT.items():
            values = [r["held_out"][key] for r in mine if key in r["held_out"]]
            entry[label] = _mean_std(values) if values else None
        summary.append(entry)
    return summary


def markdown_table(report: dict[str, Any]) -> str:
    def cell(value: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
        if value is None:
            return "-"
        spread = f" ± {scale * value['std']:.{digits}f}" if value["n"] > 1 else ""
        return f"{scale * value['mean']:.{digits}f}{spread}"

    header = ["arm", "paper", "objects AP", "match acc", "grounding acc", "Meta-Sum", *ZERO_SHOT]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in report["summary"]:
        lines.append("| " + " | ".join([entry["arm"], entry["paper_row"], *(cell(entry[p]) for p in PROBES),
                                         cell(entry["meta_sum"], digits=1),
                                         *(cell(entry[label]) for label in ZERO_SHOT)]) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], out: str | Path, plot: bool = True) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "ablation.json", out / "ablation.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    seeds = ", ".join(map(str, report["seeds"]))
    written[1].write_text(f"Ablation: {report['steps']} pretraining steps per arm, seeds {seeds}, base config "
                          f"`{report['base_config']}`; probes: linear heads on the frozen export "
                          f"({report['probe_images']['train']} / {report['probe_images']['test']} images). "
                          "Mean ± std over seeds.\n\n" + markdown_table(report))
    if plot:
        from ..plotting import pyplot

        plt = pyplot()
        summary = report["summary"]
        figure, axis = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(PROBES)
        for i, probe in enumerate(PROBES):
            axis.bar([x + i * width for x in range(len(summary))], [100 * e[probe]["mean"] for e in summary], width,
                     yerr=[100 * e[probe]["std"] for e in summary], label=probe, capsize=2)
        axis.set_xticks([x + width for x in range(len(summary))], [e["arm"].replace("+", "+\n") for e in summary],
                        fontsize=6)
        chance = statistics.fmean(r["probes"]["grounding_chance"] for r in report["rows"])
        axis.axhline(50, color="tab:orange", linestyle=":", linewidth=1, label="match chance")
        axis.axhline(100 * chance, color="tab:green", linestyle=":", linewidth=1, label="grounding chance")
        axis.set_ylabel("probe score (%)")
        axis.set_title(f"Ablation, {report['steps']} steps, seeds {seeds} (Meta-Sum = sum of the three)", fontsize=9)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
        figure.tight_layout()
        written.append(out / "ablation.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written
