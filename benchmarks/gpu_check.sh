#!/usr/bin/env bash
# The GPU check: one H100/H200 through one call of the device tool, every step bounded in time.
#   here:    bash ../shared/device/wheels.sh         # fills .whl/ with what the GPU image lacks
#   device:  bash benchmarks/gpu_check.sh            # carry [".whl"]; results under $OUT
#   CI:      bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU, tiny preset
#
# Time limits per step (seconds, GPU form; the whole check <= 470 s plus the machine's start):
#   install   30  carried wheels into /tmp/site
#   imports   30  stops the check if deepspeed / webdataset / ot do not import
#   untimed  110  in parallel, nothing timed runs meanwhile:
#                   tests (tests/test_gpu.py + the CUDA-aware kernel tests), syncs (every host
#                   synchronisation left in a training step, benchmarks/gpu_syncs.py), compilecheck
#                   (torch.compile vs eager gradients, benchmarks/compile_check.py)
#   prebuild 180  DeepSpeed's FusedAdam built by nvcc in the background from the start, in its own
#                 extensions folder (a killed build cannot leave a lock that a later process waits on)
#   compare  140  UNITER-large bf16 ZeRO-2 (ds_configs/zero2_bf16.json), ours and the baseline at 8k,
#                 16k, 32k and 48k tokens per micro-batch (out of memory is recorded, not fatal),
#                 a kernel-level profile of ours at 32k
#   efficient 45  ours at 32k with the memory-efficient attention kernel instead of PyTorch's choice
#   compiled  80  ours at 32k with torch.compile of the encoder layers
#   fusedadam 40  ours at 32k with DeepSpeed's FusedAdam (only if the prebuild succeeded)
# What comes back (<= 8 files, written as they are made, so a cut-off run still returns its reports):
# check.log (each step's exit status, time, last lines), compare.json, efficient.json,
# compiled.json, fusedadam.json, summary.json (one row per measurement), results.tar.gz (all logs).
set -uo pipefail
mode=gpu
if [ "${1:-}" = "--cpu-dry-run" ]; then mode=cpu; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
work=$(mktemp -d)
log="$OUT/check.log"
: > "$log"
python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && [ "$mode" = cpu ] && python=.venv/bin/python
started=$(date +%s)

step() {  # step NAME LIMIT COMMAND...: run bounded, log exit status, time and the end of its output
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    { echo "== $name: exit $rc after $(( $(date +%s) - start ))s$([ $rc = 124 ] && echo ' (TIME LIMIT)')"
      tail -n 25 "$work/$name.log"; } >> "$log"
    return $rc
}

if [ "$mode" = gpu ]; then
    if ! step install 30 $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl; then
        echo "GPU CHECK STOPPED: the wheel install failed (see $log)" | tee -a "$log"
        exit 3
    fi
    export PYTHONPATH=/tmp/site:$PWD
    if ! step imports 30 $python -c "import deepspeed, webdataset, ot, torch; print('deepspeed', deepspeed.__version__,
'torch', torch.__version__, torch.cuda.get_device_name())"; then
        echo "GPU CHECK STOPPED: the carried packages do not import (see $log)" | tee -a "$log"
        exit 3
    fi
    nvidia-smi > "$work/nvidia-smi.txt" 2>&1
    export TORCH_EXTENSIONS_DIR="$work/torch-extensions"
    # DeepSpeed's op builder cannot parse the image's default arch list ("9.0a"): name the card's own.
    TORCH_CUDA_ARCH_LIST=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
    ( step prebuild 180 $python -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
      echo $? > "$work/prebuild.rc" ) &
    prebuild=$!
    preset=large; budgets="8192 16384 32768 49152"; one=32768
    steps=(--batches 1 --windows 2 --steps 4)
    tests=(tests/test_gpu.py tests/test_kernels_and_cli.py -k "not model_info_command")
    limits=(110 140 45 80 40)
else
    export PYTHONPATH=$PWD
    export DS_ACCELERATOR=cpu
    preset=tiny; budgets="512 1024"; one=1024
    steps=(--batches 1 --windows 1 --steps 2)
    tests=(tests/test_gpu.py)  # skipped here: the dry run checks the plumbing, CI runs the CPU tests
    limits=(150 300 300 300 0)
    echo 0 > "$work/prebuild.rc"
    prebuild=
fi
bench=($python -m uniter_ds.cli bench)
common=(--preset $preset --zero 2 --data-dir "$work/data" --no-plots "${steps[@]}")
[ "$mode" = gpu ] && common+=(--precision bf16)

# Untimed checks, in parallel.
step tests "${limits[0]}" $python -m pytest -q -rs "${tests[@]}" &
untimed=($!)
step syncs "${limits[0]}" $python benchmarks/gpu_syncs.py --zero 0 1 2 3 --out "$work/syncs.json" \
    $([ "$mode" = cpu ] && echo --dry-run) &
untimed+=($!)
if [ "$mode" = gpu ]; then
    step compilecheck "${limits[0]}" $python benchmarks/compile_check.py &
    untimed+=($!)
fi
wait "${untimed[@]}"

# Timed measurements, one at a time.
step compare "${limits[1]}" "${bench[@]}" compare "${common[@]}" --token-budget $budgets --profile 3 \
    --profile-budget $one --out "$OUT/compare.json"
if [ "$mode" = gpu ]; then
    step efficient "${limits[2]}" "${bench[@]}" train "${common[@]}" --token-budget $one --sdpa-backend efficient \
        --out "$OUT/efficient.json"
fi
step compiled "${limits[3]}" "${bench[@]}" train "${common[@]}" --token-budget $one --compile --out "$OUT/compiled.json"
reports=("$OUT/compare.json" "$OUT/compiled.json")
if [ "$mode" = gpu ]; then
    reports=("$OUT/compare.json" "$OUT/efficient.json" "$OUT/compiled.json" "$OUT/fusedadam.json")
    wait $prebuild
    if [ "$(cat "$work/prebuild.rc" 2>/dev/null)" = 0 ]; then
        step fusedadam "${limits[4]}" "${bench[@]}" train "${common[@]}" --token-budget $one --optimizer deepspeed \
            --out "$OUT/fusedadam.json"
    else
        echo "== fusedadam: skipped, the FusedAdam build failed (prebuild.log)" >> "$log"
    fi
fi

$python benchmarks/gpu_summary.py "${reports[@]}" --out "$OUT/summary.json" > "$work/summary.txt" 2>&1
echo "== total $(( $(date +%s) - started ))s" >> "$log"
tar -czf "$OUT/results.tar.gz" -C "$work" --exclude=data --exclude=torch-extensions . 2>> "$log"
cat "$work/summary.txt"
grep -E "^== " "$log"
# The check fails when a step failed: the log says which.
! grep -qE "^== (tests|syncs|compilecheck|compare|efficient|compiled|fusedadam): exit [^0]" "$log"
