#!/usr/bin/env bash
# The main job: set-up, build the demo world on first run (cached after), serve it.
# Extra arguments go to `unlearnd demo` (e.g. --port 8000 --eval).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec unlearnd demo --workdir work/demo "$@"
