#!/usr/bin/env bash
# Installs everything dualstream needs on a fresh machine: redis-server and redis-sentinel
# (Debian packages) and a virtualenv in .venv with torch, the model libraries and the test
# tools. Safe to re-run: it does nothing when pyproject.toml has not changed since the last
# install.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-sentinel >/dev/null 2>&1; then
    echo "installing redis-server and redis-sentinel" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server redis-sentinel >/dev/null
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
    rm -f .venv/.installed-*
    touch "$stamp"
fi
