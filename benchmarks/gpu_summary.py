"""One table and one JSON from the reports of a GPU check (``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_summary.py REPORT.json [...] --out summary.json

Every measurement of every report becomes a row: what was measured (system, variant, budget), what
ran (tokens per micro-batch), the numbers (samples/s, TFLOP/s, MFU, step time, memory) or why there
are none (out of memory, not tried, a missing report).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def rows_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return [{"report": path.name, "status": "no report (the step failed or ran out of time: see its log)"}]
    report = json.loads(path.read_text())
    settings = report.get("settings", {})
    variant = []
    if settings.get("compile"):
        variant.append("compiled")
    if settings.get("optimizer", "torch") != "torch":
        variant.append(f"{settings['optimizer']} AdamW")
    if settings.get("activation_checkpointing"):
        variant.append("act. ckpt")
    if settings.get("source", "memory") != "memory":
        variant.append(f"from {settings['source']}")
    if settings.get("pack_row_len"):
        attention = settings.get("packed_attention", "auto")
        variant.append(f"packed {settings['pack_row_len']}" + (", rows" if settings.get("batching") == "rows" else "")
                       + (f", {attention}" if attention != "auto" else ""))
    if settings.get("cuda_graphs"):
        variant.append("CUDA graphs")
    rows = []
    for run in report.get("runs", []):
        for system in ("ours", "baseline"):
            if system not in run:
                continue
            result = run[system]
            row: dict[str, Any] = {"report": path.name, "system": system, "variant": ", ".join(variant) or "eager",
                                   "token_budget": run["token_budget"], "status": result.get("status", "ok")}
            if row["status"] == "ok":
                row |= {"zero": result.get("zero_stage"), "precision": result.get("precision"),
                        "tokens_per_micro_batch": round(result["mean_real_tokens_per_micro_batch"]),
                        "padding": round(result["padding_fraction"], 4),
                        "samples_per_s": round(result["samples_per_s"], 1),
                        "tokens_per_s": round(result["tokens_per_s"]),
                        "tflops": round(result["tflops"], 1), "mfu": result["mfu"],
                        "step_s": round(result["step_time_s"]["median"], 4),
                        "warmup_first_step_s": round(result.get("warmup", {}).get("first_step_s") or 0, 2),
                        "device_peak_gb": round(result["memory"].get("device_peak_gb", float("nan")), 1),
                        "kernels": result.get("kernels", {})}
                if "speedup_samples_per_s" in run and system == "ours":
                    row["speedup_vs_baseline"] = round(run["speedup_samples_per_s"], 3)
                if "profile" in result:
                    row["profile"] = {k: result["profile"][k] for k in ("by_kind_percent", "busy_ms_per_step",
                                                                         "wall_ms_per_step", "busy_fraction")}
            else:
                row["error"] = result.get("error", "")
            rows.append(row)
    if not report.get("complete", True):
        rows.append({"report": path.name, "status": "incomplete (the process stopped before the end)"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [row for path in args.reports for row in rows_of(Path(path))]
    environment = next((json.loads(Path(p).read_text()).get("environment") for p in args.reports
                        if Path(p).exists()), None)
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    print(f"{'report':<28} {'system':<8} {'variant':<16} {'budget':>6} {'tok/mb':>6} {'samples/s':>9} "
          f"{'TFLOP/s':>7} {'MFU':>6} {'step s':>7} {'GB':>5}  status")
    for row in rows:
        if row["status"] == "ok":
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            print(f"{row['report'][:28]:<28} {row['system']:<8} {row['variant'][:16]:<16} {row['token_budget']:>6} "
                  f"{row['tokens_per_micro_batch']:>6} {row['samples_per_s']:>9} {row['tflops']:>7} {mfu:>6} "
                  f"{row['step_s']:>7} {row['device_peak_gb']:>5}  ok"
                  + (f" ({row['speedup_vs_baseline']}x baseline)" if "speedup_vs_baseline" in row else ""))
        else:
            print(f"{row['report'][:28]:<28} {row.get('system', '-'):<8} {row.get('variant', '-')[:16]:<16} "
                  f"{row.get('token_budget', '-'):>6}  {row['status']} {row.get('error', '')[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
