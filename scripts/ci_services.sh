#!/usr/bin/env bash
# Services the CI tests need, on loopback only:
#   - a throwaway PostgreSQL cluster (tests/serve/test_registry_pg.py, tests/e2e/test_replicas.py)
#   - promtool and prometheus from Debian's prometheus package (tests/deploy/test_prometheus.py;
#     tests/e2e/test_prometheus_live.py starts its own prometheus on a loopback port)
#   - the nginx binary from Debian's nginx package (tests/e2e/test_proxy_affinity.py starts
#     its own nginx on a loopback port; the package's system service is never started)
# Idempotent: a second run only checks that PostgreSQL is up. Works as root on a fresh
# Debian machine (apt-get update + install); PostgreSQL refuses to run as root, so the
# cluster then runs as the `postgres` user through runuser. As a normal user it uses the
# PostgreSQL binaries already installed and runs the cluster as that user.
#
# Prints the database URL and writes it to .cache/database_url, which the tests read
# (UNLEARND_TEST_DATABASE_URL overrides the file). The cluster's superuser is `unlearnd`
# with a fixed password: it is a test cluster, listening on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

PGPORT=${UNLEARND_PG_PORT:-55432}
PGROOT=${UNLEARND_PG_DIR:-/tmp/unlearnd-ci-pg}
PGUSER_NAME=unlearnd
PGPASS=unlearnd-ci-password
PGDB=unlearnd
URL="postgresql://${PGUSER_NAME}:${PGPASS}@127.0.0.1:${PGPORT}/${PGDB}"

pg_bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

# -- packages -------------------------------------------------------------------------
need=()
[ -n "$(pg_bindir)" ] || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ci_services: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the packages must not start their own system services (no init
    # here; our cluster runs on its own port, we only need promtool, and the proxy test
    # runs nginx itself; nginx's service would otherwise take port 80).
    policy=/usr/sbin/policy-rc.d
    had_policy=0; [ -e "$policy" ] && had_policy=1
    [ "$had_policy" -eq 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ "$had_policy" -eq 1 ] || rm -f "$policy"
  else
    echo "ci_services: missing ${need[*]} and not root with apt-get; tests needing them skip" >&2
  fi
fi

# -- PostgreSQL -----------------------------------------------------------------------
BIN=$(pg_bindir)
if [ -z "$BIN" ]; then
  echo "ci_services: no PostgreSQL server binaries; PostgreSQL tests will skip" >&2
  exit 0
fi
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}
mkdir -p "$PGROOT"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PGROOT"
DATA="$PGROOT/data"
if [ ! -s "$DATA/PG_VERSION" ]; then
  pwfile="$PGROOT/.pw"
  printf '%s\n' "$PGPASS" > "$pwfile"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pwfile"
  as_pg "$BIN/initdb" -D "$DATA" -U "$PGUSER_NAME" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-instructions >/dev/null
  rm -f "$pwfile"
fi
if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  # fsync off: a throwaway test cluster; durability is not what the tests check.
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$PGROOT/postgres.log" -w -t 60 start -o \
    "-p $PGPORT -k $PGROOT -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
    >/dev/null
fi
psql_() { PGPASSWORD="$PGPASS" "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U "$PGUSER_NAME" -qtA "$@"; }
if [ "$(psql_ -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PGDB'")" != "1" ]; then
  psql_ -d postgres -c "CREATE DATABASE $PGDB" >/dev/null
fi
psql_ -d "$PGDB" -c "SELECT 1" >/dev/null
mkdir -p .cache
printf '%s\n' "$URL" > .cache/database_url
echo "DATABASE_URL=$URL"
