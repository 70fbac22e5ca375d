#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OMOPFL_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp="$VENV/.omopfl-installed"
want="$(cat pyproject.toml scripts/env.sh | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "omopfl: creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "omopfl: installing dependencies into $VENV (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'pip>=24' >&2
  # torch is pinned to 2.13.0 in pyproject.toml; pip takes the local CPU wheel when present.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]' >&2
  # Second cohort translator, used by the tests to cross-check duckcdm (see pyproject's test extra).
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps 'ohdsi-circepy==0.3.0' >&2
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
