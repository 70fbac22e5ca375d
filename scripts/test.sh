#!/usr/bin/env bash
# The test command: environment, lint, then pytest on DuckDB and on a throwaway PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
.venv/bin/ruff check omopfl tests bench examples
bash scripts/browser.sh
bash scripts/with-postgres.sh .venv/bin/python -m pytest -p no:cacheprovider "$@"
