#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The job store's PostgreSQL tests start a throwaway server from Debian's package.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
exec .venv/bin/python -m pytest tests "$@"
