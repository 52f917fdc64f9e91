#!/usr/bin/env bash
# The CPU rows of benchmarks/RESULTS.md, in one go (about 30 minutes on the project's 2-core machine).
# Run from the repository root with the venv active: bash benchmarks/cpu_suite.sh [results folder]
set -euo pipefail
out=${1:-benchmarks/results}
data=${BENCH_DATA_DIR:-/tmp/uniter-ds-bench}
mkdir -p "$out"
# bf16 where this CPU computes it natively (AVX512-BF16, AMX), else fp32 (emulated bf16 is ~25x slower).
precision=${PRECISION:-$(python -c "from uniter_ds.bench.throughput import default_precision; print(default_precision(False))")}
echo "precision: $precision"
# Ours vs the baseline on the base preset, a token-budget sweep, with a profile.
uniter-ds bench compare --preset base --precision $precision --zero 0 --token-budget 512 1024 2048 --batches 2 \
    --warmup 2 --windows 2 --steps 4 --profile 4 --data-dir "$data" --out "$out/compare-base-cpu-$precision.json"
# The same at fp32, one budget.
uniter-ds bench compare --preset base --precision fp32 --zero 0 --token-budget 1024 --batches 2 \
    --warmup 2 --windows 2 --steps 4 --data-dir "$data" --out "$out/compare-base-cpu-fp32.json"
# Under the deepspeed launcher: 2 CPU ranks (1 core each), ZeRO-2, batches from the live shard reader.
uniter-ds bench train --num-gpus 2 --preset base --precision $precision --zero 2 --token-budget 1024 --source shards \
    --workers 1 --warmup 2 --windows 2 --steps 4 --data-dir "$data" --out "$out/train-base-cpu-2ranks.json"
# Largest token budget under a 4 GB host-memory limit, without and with activation checkpointing.
uniter-ds bench memory --preset base --precision $precision --zero 0 --limit-gb 4 --start 1024 --resolution 512 \
    --data-dir "$data" --out "$out/memory-base-cpu.json"
uniter-ds bench memory --preset base --precision $precision --zero 0 --limit-gb 4 --start 1024 --resolution 512 \
    --activation-checkpointing --data-dir "$data" --out "$out/memory-base-cpu-ckpt.json"
# The data loader.
uniter-ds bench data --seconds 4 --workers 0 1 --data-dir "$data" --out "$out/data_loader.json"
