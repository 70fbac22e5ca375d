#!/usr/bin/env bash
# Make sure Debian's chromium is installed (the run view's headless-browser test drives it through
# playwright; playwright's own browser download cannot work offline).  Installs only when it is missing,
# and only as root (CI runs as root on a fresh machine); otherwise says what to do and leaves it to the test.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "omopfl: chromium is missing (sudo apt-get install chromium); the browser test will be skipped" >&2
  exit 0
fi
echo "omopfl: installing Debian's chromium with apt (the run view's browser test)" >&2
if ! { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2; }; then
  echo "omopfl: apt-get install chromium failed; the browser test will say so" >&2
fi
