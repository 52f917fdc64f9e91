"""The whole model, forward + backward, over one pool of samples in the padded and the packed layout.

``uniter-ds bench train`` compares each layout on the batches its own batcher makes, which hold other
samples (the row-filling batcher mixes lengths; the budget batcher takes samples of similar length),
so its per-token and per-sample rates weigh the per-sample work (heads, IPOT) differently. Here both
layouts get the same pool, batched as training batches it:

- padded: the pool sorted by length and cut into micro-batches of at most ``--tokens`` padded tokens
  ([samples, longest]), as the budget batcher does;
- packed: the pool packed best-fit decreasing into rows of ``--row-len``, ``--tokens // --row-len``
  rows per micro-batch, as the row-filling batcher does; once per attention form (mask, nested,
  buckets).

Time to run the whole pool (every micro-batch once, forward and backward, one task), median of
``--repeats`` after a warm-up pass; the same initial weights, dropout on.

    python benchmarks/packed_layout.py --preset base --tokens 1024 --pool 64 --out results/packed_layout.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uniter_ds.bench.samples import collate, random_sample  # noqa: E402
from uniter_ds.model import UniterConfig, UniterForPretraining  # noqa: E402
from uniter_ds.model.inputs import best_fit_rows  # noqa: E402
from uniter_ds.provenance import cpu_name, git_commit  # noqa: E402


def pool_of(config: UniterConfig, size: int, seed: int) -> list[dict]:
    """Samples with the synthetic data's lengths: 3-62 text tokens (with [CLS], [SEP]), 10-100 regions."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    return [random_sample(config, int(rng.integers(3, 63)), int(rng.integers(10, 101)), generator)
            for _ in range(size)]


def length(sample: dict) -> int:
    return len(sample["input_ids"]) + len(sample["img_feat"])


def padded_batches(pool: list[dict], tokens: int) -> list[list[dict]]:
    ordered = sorted(pool, key=length)
    batches, current = [], []
    for sample in ordered:
        if current and (len(current) + 1) * length(sample) > tokens:
            batches.append(current)
            current = []
        current.append(sample)
    return batches + [current] if current else batches


def packed_batches(pool: list[dict], tokens: int, row_len: int) -> list[list[dict]]:
    rows = best_fit_rows([length(s) for s in pool], row_len)
    per_batch = tokens // row_len
    return [[pool[i] for row in rows[start:start + per_batch] for i in row] for start in range(0, len(rows), per_batch)]


def run_pool(model: UniterForPretraining, batches: list, task: str, dtype: torch.dtype) -> float:
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(batch, task).loss
        loss.backward()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (padded or in rows)")
    parser.add_argument("--row-len", type=int, default=256)
    parser.add_argument("--pool", type=int, default=96, help="samples in the pool")
    parser.add_argument("--tasks", nargs="+", default=["mlm", "itm"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config = UniterConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = UniterForPretraining(config).train()
    pool = pool_of(config, args.pool, args.seed)
    itm = lambda samples: [i % 2 for i in range(len(samples))]  # noqa: E731
    padded = [collate(b, itm(b)) for b in padded_batches(pool, args.tokens)]
    packed = [collate(b, itm(b), pack_row_len=args.row_len) for b in packed_batches(pool, args.tokens, args.row_len)]
    real = sum(length(s) for s in pool)
    forms = ("mask", "nested", "buckets")
    variants = {"padded": (padded, None)} | {f"packed, {form}": (packed, form) for form in forms}
    report = {"command": "python benchmarks/packed_layout.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None and k != "out"),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(), "cpu": cpu_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "real_tokens": real,
              "micro_batches": {"padded": len(padded), "packed": len(packed)},
              "tokens_run": {"padded": sum(b.attn_mask.numel() for b in padded),
                             "packed": sum(b.pack_index.numel() for b in packed)},
              "seconds": {}}
    print(f"pool: {len(pool)} samples, {real} real tokens; padded: {len(padded)} micro-batches, "
          f"{report['tokens_run']['padded']} tokens run; packed: {len(packed)} micro-batches, "
          f"{report['tokens_run']['packed']} tokens run")
    for task in args.tasks:
        for name, (batches, form) in variants.items():
            model.uniter.encoder.packed_attention = form or "auto"
            run_pool(model, batches, task, dtype)  # warm-up
            times = [run_pool(model, batches, task, dtype) for _ in range(args.repeats)]
            model.zero_grad(set_to_none=True)
            report["seconds"].setdefault(task, {})[name] = times
        base = statistics.median(report["seconds"][task]["padded"])
        for name, times in report["seconds"][task].items():
            median = statistics.median(times)
            print(f"{task:<5} {name:<16} {median:7.2f} s per pool ({', '.join(f'{t:.2f}' for t in times)})  "
                  f"{base / median:5.2f}x the padded layout's speed")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
