#!/usr/bin/env bash
# The main job on the embedded default (DuckDB): no server needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec .venv/bin/omopfl demo "$@"
