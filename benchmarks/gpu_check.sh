#!/usr/bin/env bash
# The whole GPU check in one script, for a session that is lent an H100/H200 (device tool):
#   here:   bash ../shared/device/wheels.sh            # fills .whl/ with what the GPU image lacks
#   device: bash benchmarks/gpu_check.sh               # (run with carry=[".whl"]), writes results under $OUT
# It installs the carried wheels, runs the model and export tests on the GPU, then UNITER-large bf16
# ZeRO-2 against the baseline at two token budgets. Each step is bounded so a slow one cannot eat the
# session's device time.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m uniter_ds.cli model-info --preset large > "$OUT/model-info.txt" 2>&1
timeout 240 python3 -m pytest -q -x tests/test_model.py tests/test_losses.py tests/test_ot.py tests/test_bench.py \
    -k "not cli" > "$OUT/pytest.txt" 2>&1
for budget in 4096 8192; do
    timeout 200 python3 -m uniter_ds.cli bench compare --preset large --precision bf16 --zero 2 \
        --token-budget "$budget" --batches 4 --warmup 5 --windows 3 --steps 10 --data-dir /tmp/bench-data \
        --out "$OUT/compare-large-bf16-zero2-$budget.json" > "$OUT/compare-$budget.txt" 2>&1
done
tail -n 5 "$OUT"/*.txt
