#!/usr/bin/env bash
# Set up a development environment from a fresh clone and run a job in it.
#   bash launch/dev.sh test      # virtual env + CPU torch (no GPU) + package[test], then the whole test suite
#   bash launch/dev.sh demo      # the main job: synthetic shards -> pretraining (deepspeed launcher, 2 CPU
#                                # ranks without a GPU) -> evaluation -> MLflow record -> exported weights
# The environment lives in .venv (override with UNITER_DS_VENV); re-running reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UNITER_DS_VENV:-.venv}"
python="${PYTHON:-python3}"

# pip's output goes to a log that is shown only when it fails.
quiet_pip() {
    local log
    log=$(mktemp)
    if ! "$venv/bin/python" -m pip "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    local py="$venv/bin/python"
    quiet_pip install --upgrade pip
    if ! "$py" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            quiet_pip install "torch>=2.3,<2.16"
        else
            # The development machines hold this CPU wheel locally; an unpinned torch would pull
            # a multi-GB CUDA build.
            quiet_pip install "torch==2.13.0"
        fi
    fi
    quiet_pip install -e ".[test]"
    # DeepSpeed's JIT-compiled ops, built now into this environment's folder (uniter_ds/train/extensions.py):
    # no job compiles at start, and one killed mid-build cannot leave a lock that hangs the next.
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/$venv/torch-extensions}"
    "$venv/bin/uniter-ds" prebuild
}

cmd="${1:-test}"
shift || true
case "$cmd" in
    setup)
        setup ;;
    test)
        setup
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
        "$venv/bin/python" -m ruff check .
        # Two test processes (UNITER_DS_TEST_WORKERS; 0: one); tests sharing a trained run stay together;
        # the 25 slowest tests are listed, so that every CI log says where the suite's time goes.
        exec "$venv/bin/python" -m pytest -n "${UNITER_DS_TEST_WORKERS:-2}" --dist loadgroup --durations=25 "$@" ;;
    demo)
        setup
        export PATH="$PWD/$venv/bin:$PATH"
        # The demo's world: 40 object classes, 2-4 per image, 4-8 regions each (a tiny model on 10-40
        # regions needs ~4x the steps; benchmarks/RESULTS.md). Data from another world is rewritten.
        for split in "train 3000 0" "val 300 1"; do
            read -r name images seed <<< "$split"
            if ! "$venv/bin/python" - "data/synth-$name" <<'PY' 2>/dev/null; then
import json, sys
source = json.load(open(sys.argv[1] + "/manifest.json"))["source"]
sys.exit(0 if source.get("regions") == [4, 8] and source.get("num_classes") == 40 else 1)
PY
                uniter-ds data synth --out "data/synth-$name" --images "$images" --img-dim 64 --img-label-dim 41 \
                    --min-regions 4 --max-regions 8 --shard-mb 4 --seed "$seed"
            fi
        done
        # Stage 1 stands in for BERT's weights (launch/demo-init.yaml says why); the main job starts from it.
        uniter-ds pretrain --config launch/demo-init.yaml
        exec uniter-ds pretrain --config launch/demo.yaml "$@" ;;
    *)
        echo "usage: bash launch/dev.sh {setup|test|demo} [args]" >&2
        exit 2 ;;
esac
