#!/usr/bin/env bash
# The whole GPU check in one script, for a session that is lent an H100/H200 (device tool):
#   here:   bash ../shared/device/wheels.sh            # fills .whl/ with what the GPU image lacks
#   device: bash benchmarks/gpu_check.sh               # (run with carry=[".whl"]), writes results under $OUT
# It installs the carried wheels, runs the model/kernel/bench tests on the GPU, searches the largest
# token budget for UNITER-large bf16 ZeRO-2, then compares ours with the baseline at 4096 tokens and at
# that budget (with a profile). Every step is bounded so a slow one cannot eat the session's device time.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m uniter_ds.cli model-info --preset large > "$OUT/model-info.txt" 2>&1
timeout 150 python3 -m pytest -q -x tests/test_model.py tests/test_losses.py tests/test_ot.py \
    tests/test_kernels_and_cli.py tests/test_bench.py -k "not cli and not launcher and not memory" \
    > "$OUT/pytest.txt" 2>&1
timeout 150 python3 -m uniter_ds.cli bench memory --preset large --precision bf16 --zero 2 --start 8192 \
    --max-budget 65536 --resolution 4096 --data-dir /tmp/bench-data --out "$OUT/memory-large-bf16-zero2.json" \
    > "$OUT/memory.txt" 2>&1
largest=$(python3 -c "import json; print(json.load(open('$OUT/memory-large-bf16-zero2.json'))['largest_token_budget'] or 8192)" \
    2>/dev/null || echo 8192)
timeout 240 python3 -m uniter_ds.cli bench compare --preset large --precision bf16 --zero 2 \
    --token-budget 4096 "$largest" --batches 3 --warmup 4 --windows 3 --steps 8 --profile 4 \
    --data-dir /tmp/bench-data --out "$OUT/compare-large-bf16-zero2.json" > "$OUT/compare.txt" 2>&1
tail -n 12 "$OUT"/*.txt
