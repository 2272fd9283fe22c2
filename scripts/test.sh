#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite offline, after the quality gates: ruff, the
# import contracts (pyproject.toml, [tool.importlinter]) and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
lint-imports
mypy
python -m pytest -q --durations=25 "$@"
