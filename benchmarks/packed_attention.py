"""Attention alone, forward + backward with dropout, in the three forms a packed layout could use:

- padded:  [samples, heads, longest, d] with a key mask: what the padded layout runs (a micro-batch of
           similar lengths, as the budget batcher makes them);
- rows:    [rows, heads, row_len, d] with a block-diagonal mask: what the packed layout runs today
           (samples packed best-fit into rows; every masked block is still computed);
- nested:  a jagged nested tensor, one sequence per sample (SDPA's varlen path: flash / memory-efficient
           kernels on CUDA, a per-sample loop elsewhere).

The same samples in all three (lengths drawn like the synthetic data: 3-62 text + 10-100 regions, about
``--tokens`` of them), each form timed after a warm-up, with the number of attention scores it computes.

    python benchmarks/packed_attention.py --preset base --tokens 1024 --out results/packed_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uniter_ds.model import UniterConfig
from uniter_ds.model.inputs import best_fit_rows


def sample_lengths(tokens: int, seed: int) -> list[int]:
    """Similar lengths, as one of the budget batcher's micro-batches: a slice of a sorted pool."""
    rng = np.random.default_rng(seed)
    pool = sorted((rng.integers(3, 63, 4096) + rng.integers(10, 101, 4096)).tolist())
    start = int(rng.integers(0, len(pool) // 2))
    lengths: list[int] = []
    while (len(lengths) + 1) * pool[start + len(lengths)] <= tokens:
        lengths.append(pool[start + len(lengths)])
    return lengths


def forms(lengths: list[int], row_len: int, heads: int, head_dim: int, device: torch.device,
          dtype: torch.dtype) -> dict[str, tuple]:
    """Per form: (q with requires_grad, attention mask or None, scores computed)."""
    made = {}
    longest = max(lengths)
    padded = torch.randn(len(lengths), heads, longest, head_dim, device=device, dtype=dtype, requires_grad=True)
    key_mask = (torch.arange(longest, device=device)[None] < torch.tensor(lengths, device=device)[:, None])
    made["padded"] = (padded, key_mask[:, None, None, :], len(lengths) * longest**2)
    rows = best_fit_rows(lengths, row_len)
    segments = torch.full((len(rows), row_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for sample in members:
            segments[r, start:start + lengths[sample]] = sample
            start += lengths[sample]
    segments = segments.to(device)
    packed = torch.randn(len(rows), heads, row_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    made["rows"] = (packed, (segments[:, :, None] == segments[:, None, :])[:, None], len(rows) * row_len**2)
    values = torch.randn(sum(lengths), heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], device=device)
    made["nested"] = ((values, offsets), None, sum(length**2 for length in lengths))
    return made


def run_once(form: str, q, mask, dropout: float) -> None:
    if form == "nested":
        values, offsets = q
        nested = torch.nested.nested_tensor_from_jagged(values, offsets).transpose(1, 2)
        out = F.scaled_dot_product_attention(nested, nested, nested, dropout_p=dropout)
        out.transpose(1, 2).values().float().sum().backward()
    else:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=dropout).float().sum().backward()


def timed(form: str, q, mask, dropout: float, device: torch.device, repeats: int) -> list[float]:
    run_once(form, q, mask, dropout)  # warm-up: kernel choice, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_once(form, q, mask, dropout)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--tokens", type=int, default=1024, help="about this many tokens of samples")
    parser.add_argument("--row-len", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config = UniterConfig.from_preset(args.preset)
    results: dict[str, dict] = {}
    for seed in args.seeds:
        lengths = sample_lengths(args.tokens, seed)
        made = forms(lengths, args.row_len, config.num_attention_heads, config.head_dim, device, dtype)
        for form, (q, mask, scores) in made.items():
            times = timed(form, q, mask, args.dropout, device, args.repeats)
            entry = results.setdefault(form, {"ms": [], "scores": 0, "real_tokens": 0})
            entry["ms"].append(1000 * statistics.median(times))
            entry["scores"] += scores
            entry["real_tokens"] += sum(lengths)
    report = {"command": "python benchmarks/packed_attention.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None and k != "out"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "forms": {}}
    padded_ms = sum(results["padded"]["ms"])
    print(f"{'form':<8} {'ms (per seed)':<28} {'vs padded':>9} {'scores / padded':>15}")
    for form, entry in results.items():
        ratio = sum(entry["ms"]) / padded_ms
        score_ratio = entry["scores"] / results["padded"]["scores"]
        report["forms"][form] = entry | {"time_vs_padded": ratio, "scores_vs_padded": score_ratio}
        print(f"{form:<8} {', '.join(f'{ms:.1f}' for ms in entry['ms']):<28} {ratio:>9.2f} {score_ratio:>15.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
