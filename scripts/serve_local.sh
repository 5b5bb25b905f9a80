#!/usr/bin/env bash
# Set up, then serve the CPU default config (http://127.0.0.1:8000): the video graph at /
# and the coder LLM at /coder (set CODER_ADMIN_TOKEN to enable its weight-reload route).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/serve run "${1:-configs/local.yaml}"
