#!/usr/bin/env bash
# Run a command beside a throwaway PostgreSQL server on loopback.
# Exports OMOPFL_TEST_PG_URL (superuser URL) for the command; stops the server and
# removes its data directory on exit, whether the command passed or failed.
set -euo pipefail
PGBIN="${PGBIN:-}"
if [[ -z "$PGBIN" ]]; then
  for d in /usr/lib/postgresql/*/bin; do [[ -x "$d/initdb" ]] && PGBIN="$d"; done
fi
if [[ -z "$PGBIN" ]] && command -v initdb >/dev/null 2>&1; then PGBIN="$(dirname "$(command -v initdb)")"; fi
if [[ -z "$PGBIN" ]]; then
  echo "omopfl: PostgreSQL server binaries not found; installing postgresql with apt" >&2
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  for d in /usr/lib/postgresql/*/bin; do [[ -x "$d/initdb" ]] && PGBIN="$d"; done
fi
RUNAS=()
if [[ "$(id -u)" == 0 ]]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  RUNAS=(runuser -u postgres --)
fi
DATA="$(mktemp -d /tmp/omopfl-pg.XXXXXX)"
chmod 700 "$DATA"
[[ ${#RUNAS[@]} -gt 0 ]] && chown postgres "$DATA"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
cleanup() {
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DATA/db" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$DATA"
}
trap cleanup EXIT INT TERM
"${RUNAS[@]}" "$PGBIN/initdb" -D "$DATA/db" -U postgres --auth=trust -E UTF8 >/dev/null
# One role must give its password (tests of a wrong password); every other connection is trusted.
"${RUNAS[@]}" sh -c "printf 'host all omopfl_password_test 127.0.0.1/32 scram-sha-256\n' | cat - '$DATA/db/pg_hba.conf' > '$DATA/db/pg_hba.new' && mv '$DATA/db/pg_hba.new' '$DATA/db/pg_hba.conf'"
"${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DATA/db" -l "$DATA/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" \
  start >/dev/null
export OMOPFL_TEST_PG_URL="postgresql+psycopg2://postgres@127.0.0.1:$PORT/postgres"
export OMOPFL_TEST_PG_PASSWORD_ROLE=omopfl_password_test
echo "omopfl: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') ready on 127.0.0.1:$PORT" >&2
set +e
"$@"
status=$?
set -e
exit $status
