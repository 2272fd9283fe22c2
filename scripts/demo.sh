#!/usr/bin/env bash
# Sets up (if needed) and runs dualstream end to end on embedded defaults: a private
# redis-server, a local folder as object store, a tiny model and sample images. Prints labels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec dualstream demo "$@"
