#!/usr/bin/env bash
# The test command (README and .ci/run): set-up, then the whole suite, unit and end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -ra "$@"
