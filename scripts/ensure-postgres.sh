#!/usr/bin/env bash
# Makes a PostgreSQL server reachable for the test suite and prints the URL
# to use (last line of stdout). Order of preference:
#   1. SHAMAL_TEST_POSTGRES_URL, if set and reachable;
#   2. a server already listening on 127.0.0.1:5432 (trust auth, user postgres);
#   3. a project-local cluster under .deps/pgdata on port 54329, created with
#      the machine's PostgreSQL binaries, installed from Debian's packages
#      when absent (needs root and apt).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

reachable() { # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

if [ -n "${SHAMAL_TEST_POSTGRES_URL:-}" ]; then
  echo "$SHAMAL_TEST_POSTGRES_URL"
  exit 0
fi

if reachable 127.0.0.1 5432 && command -v psql >/dev/null 2>&1 && \
   psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  echo "postgres://postgres@127.0.0.1:5432/postgres"
  exit 0
fi

port=54329
data="$root/.deps/pgdata"
url="postgres://postgres@127.0.0.1:$port/postgres"
if reachable 127.0.0.1 "$port"; then
  echo "$url"
  exit 0
fi

find_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  ls /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -1
}
initdb_bin="$(find_bin initdb || true)"
if [ -z "$initdb_bin" ]; then
  echo "ensure-postgres: installing PostgreSQL from Debian's packages" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "ensure-postgres: no PostgreSQL server and not root: install postgresql or set SHAMAL_TEST_POSTGRES_URL" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  initdb_bin="$(find_bin initdb)"
fi
pg_ctl_bin="$(dirname "$initdb_bin")/pg_ctl"

# PostgreSQL refuses to run as root: run the local cluster as `postgres`
# (created by the Debian package) or the invoking user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir "$data" postgres
fi
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}
mkdir -p "$root/.deps"
if [ ! -f "$data/PG_VERSION" ]; then
  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then chown postgres "$data"; fi
  as_owner "$initdb_bin" -D "$data" -U postgres --auth=trust >&2
fi
as_owner "$pg_ctl_bin" -D "$data" -l "$data/server.log" -w \
  -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off" start >&2
echo "$url"
