#!/usr/bin/env bash
# The GPU check in one command, on a lent device machine (BENCHMARKS.md, "The GPU path"):
#
#     bash bench/gpu_check.sh "$OUT" [python -m bench.gpu options]
#
# The 8-minute deadline counts from this script's start. The device machine reaches no network,
# so scripts/setup.sh cannot install there: this uses .venv when the checkout has one, else the
# image's python3 (torch, torchvision, transformers, Pillow, pyarrow, pytest are there) plus what
# bench/gpu_carry.sh put in .carry/ here (wheels, and redis-server with its libraries), which the
# device call must name in `carry`. bench.gpu's report lists anything still missing.
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [bench.gpu options]}
shift
PY=python3
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif [ -d .carry/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dualstream-site .carry/wheels/*.whl
    export PYTHONPATH=/tmp/dualstream-site
fi
if [ -d .carry/redis ]; then
    export PATH="$PWD/.carry/redis/bin:$PATH"
    export LD_LIBRARY_PATH="$PWD/.carry/redis/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "setup took $(( $(date +%s) - started )) s" >&2
exec "$PY" -m bench.gpu --out "$out" --since "$started" "$@"
