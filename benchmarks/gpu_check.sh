#!/usr/bin/env bash
# The GPU check: one H100/H200 through one call of the device tool, every step bounded in time.
#   here:    bash ../shared/device/wheels.sh         # fills .whl/ with what the GPU image lacks
#   device:  bash benchmarks/gpu_check.sh            # carry [".whl"]; results under $OUT
#   CI:      bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU, tiny preset
#
# Steps and their time limits (seconds, GPU form; the whole check <= 400 s plus the machine's start):
#   install  30   carried wheels into /tmp/site; stops the check if deepspeed/webdataset/ot do not import
#   prebuild 180  DeepSpeed's FusedAdam built by nvcc in the background (own extensions folder, so a
#                 killed build cannot leave a lock that a later process would wait on)
#   tests    120  tests/test_gpu.py + the CUDA-aware kernel tests
#   syncs     45  every host synchronisation left in a training step (benchmarks/gpu_syncs.py)
#   compare  150  UNITER-large bf16 ZeRO-2, ours eager at 8k/16k/32k/48k tokens, the baseline at the
#                 same budgets (out of memory is recorded, not fatal), a profile at 32k
#   compiled  90  ours with torch.compile at 16k and 32k
#   fusedadam 45  ours with DeepSpeed's FusedAdam at 32k (only if the prebuild succeeded)
# What comes back (<= 8 files): check.log (every step's exit status, time and last lines),
# summary.json (one row per measurement), results.tar.gz (every report, log and profile).
set -uo pipefail
mode=gpu
if [ "${1:-}" = "--cpu-dry-run" ]; then mode=cpu; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
work=$(mktemp -d)
log="$OUT/check.log"
: > "$log"
python=python3
[ -x .venv/bin/python ] && [ "$mode" = cpu ] && python=.venv/bin/python
started=$(date +%s)

step() {  # step NAME LIMIT COMMAND...: run bounded, log exit status, time and the end of its output
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start ))s$([ $rc = 124 ] && echo ' (TIME LIMIT)')" >> "$log"
    tail -n 25 "$work/$name.log" >> "$log"
    return $rc
}

if [ "$mode" = gpu ]; then
    if ! step install 30 $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl; then
        echo "GPU CHECK STOPPED: the wheel install failed (see $log)" | tee -a "$log"
        exit 3
    fi
    export PYTHONPATH=/tmp/site:$PWD
    if ! step imports 30 $python -c "import deepspeed, webdataset, ot; print('deepspeed', deepspeed.__version__)"; then
        echo "GPU CHECK STOPPED: the carried packages do not import (see $log)" | tee -a "$log"
        exit 3
    fi
    nvidia-smi > "$work/nvidia-smi.txt" 2>&1
    export TORCH_EXTENSIONS_DIR="$work/torch-extensions"
    ( step prebuild 180 $python -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
      echo $? > "$work/prebuild.rc" ) &
    prebuild=$!
    preset=large; budgets="8192 16384 32768 49152"; profile_budget=32768; compiled_budgets="16384 32768"
    steps=(--batches 2 --warmup 3 --windows 2 --steps 4)
    tests=(tests/test_gpu.py tests/test_kernels_and_cli.py -k "not model_info_command")
    limits=(120 45 150 90 45)
else
    export PYTHONPATH=$PWD
    export DS_ACCELERATOR=cpu
    preset=tiny; budgets="512 1024"; profile_budget=1024; compiled_budgets="1024"
    steps=(--batches 1 --warmup 1 --windows 1 --steps 2)
    tests=(tests/test_gpu.py)  # skipped here: the dry run checks the plumbing, CI runs the CPU tests
    limits=(120 120 300 300 0)
    echo 0 > "$work/prebuild.rc"
fi
data="$work/data"
bench=($python -m uniter_ds.cli bench)
common=(--preset $preset --zero 2 --data-dir "$data" --no-plots "${steps[@]}")
[ "$mode" = gpu ] && common+=(--precision bf16)

step tests "${limits[0]}" $python -m pytest -q -rs "${tests[@]}"
step syncs "${limits[1]}" $python benchmarks/gpu_syncs.py --zero 0 2 3 --out "$work/syncs.json" \
    $([ "$mode" = cpu ] && echo --dry-run)
step compare "${limits[2]}" "${bench[@]}" compare "${common[@]}" --token-budget $budgets --profile 3 \
    --profile-budget $profile_budget --out "$work/compare.json"
step compiled "${limits[3]}" "${bench[@]}" train "${common[@]}" --token-budget $compiled_budgets --compile \
    --out "$work/compiled.json"
if [ "$mode" = gpu ]; then
    wait $prebuild
    if [ "$(cat "$work/prebuild.rc" 2>/dev/null)" = 0 ]; then
        step fusedadam "${limits[4]}" "${bench[@]}" train "${common[@]}" --token-budget $profile_budget \
            --optimizer deepspeed --out "$work/fusedadam.json"
    else
        echo "== fusedadam: skipped, the FusedAdam build failed (prebuild.log)" >> "$log"
    fi
fi

reports=("$work/compare.json" "$work/compiled.json")
[ "$mode" = gpu ] && reports+=("$work/fusedadam.json")
$python benchmarks/gpu_summary.py "${reports[@]}" --out "$OUT/summary.json" > "$work/summary.txt" 2>&1
echo "== total $(( $(date +%s) - started ))s" >> "$log"
tar -czf "$OUT/results.tar.gz" -C "$work" --exclude=data --exclude=torch-extensions . 2>> "$log"
cat "$work/summary.txt"
grep -E "^== " "$log"
# The check fails when a step failed: the log says which.
! grep -qE "^== (tests|syncs|compare|compiled|fusedadam): exit [^0]" "$log"
