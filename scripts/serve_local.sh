#!/usr/bin/env bash
# Set up, then serve the video graph on the CPU default config (http://127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/serve run "${1:-configs/local.yaml}"
