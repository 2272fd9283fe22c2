#!/usr/bin/env bash
# Run HERE (a machine with network and this checkout's .venv), before a device call: puts in
# .carry/ (ignored by git through .git/info/exclude) what the device's CUDA image lacks for
# bench/gpu_check.sh: wheels for CPython 3.12 x86-64 of the Python packages below, at the
# versions this .venv has, and this machine's redis-server with the two libraries a Ubuntu
# image may lack. Then name ".carry" in the device call's `carry` (64 MiB with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
rm -rf .carry && mkdir -p .carry/wheels .carry/redis/bin .carry/redis/lib
# Not in the image (KINDS.md's package list), or older there than pyproject.toml allows.
packages="celery kombu billiard vine amqp click-didyoumean click-repl click-plugins
    prompt_toolkit wcwidth tzdata redis hiredis boto3 botocore s3transfer jmespath pydantic
    pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
    open_clip_torch ftfy transformers"
pinned=$(.venv/bin/python - $packages <<'PY'
import sys
from importlib import metadata
print(" ".join(f"{name}=={metadata.version(name)}" for name in sys.argv[1:]))
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .carry/wheels $pinned
cp "$(command -v redis-server)" .carry/redis/bin/
for lib in liblzf.so.1 libjemalloc.so.2; do
    path=$(ldd "$(command -v redis-server)" | awk -v l="$lib" '$1 == l {print $3}')
    [ -n "$path" ] && cp -L "$path" .carry/redis/lib/
done
du -sh .carry
