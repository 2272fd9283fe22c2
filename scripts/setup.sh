#!/usr/bin/env bash
# Installs everything dualstream needs on a fresh machine: redis-server and redis-sentinel
# (Debian packages) and a virtualenv in .venv with torch, the model libraries and the test
# tools. Safe to re-run: it does nothing when pyproject.toml has not changed since the last
# install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real: Redis and Sentinel, and Prometheus with promtool
# (tests/test_monitoring.py scrapes a worker and checks the alert rules).
packages=""
command -v redis-server >/dev/null 2>&1 || packages="$packages redis-server"
command -v redis-sentinel >/dev/null 2>&1 || packages="$packages redis-sentinel"
command -v promtool >/dev/null 2>&1 || packages="$packages prometheus"
if [ -n "$packages" ]; then
    echo "installing$packages" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        $packages >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    # torch first, pinned with its matching torchvision: with torch 2.13.0, open_clip pulls in a
    # torchvision that fails to import, so torch 2.14.1 and torchvision 0.29.1 go in first.
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install -q -e '.[worker,bench,dev]'
    # autofaiss pins numpy<2, which pyarrow here cannot take; it runs on numpy 2 (the export
    # test builds an index with it), so it goes in without its pins (its other needs are in dev).
    .venv/bin/pip install -q --no-deps 'autofaiss==2.18.0'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
