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
        exec "$venv/bin/python" -m pytest "$@" ;;
    demo)
        setup
        export PATH="$PWD/$venv/bin:$PATH"
        [ -f data/synth-train/manifest.json ] || uniter-ds data synth --out data/synth-train --images 3000 \
            --img-dim 64 --img-label-dim 41 --min-regions 10 --max-regions 40 --shard-mb 4 --seed 0
        [ -f data/synth-val/manifest.json ] || uniter-ds data synth --out data/synth-val --images 300 \
            --img-dim 64 --img-label-dim 41 --min-regions 10 --max-regions 40 --shard-mb 4 --seed 1
        exec uniter-ds pretrain --config launch/demo.yaml "$@" ;;
    *)
        echo "usage: bash launch/dev.sh {setup|test|demo} [args]" >&2
        exit 2 ;;
esac
