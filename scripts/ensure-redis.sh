#!/usr/bin/env bash
# Makes a Redis server reachable for the test suite and prints the URL to use
# (last line of stdout). Also makes sure the redis-server binary is installed:
# the async queue's crash test starts (and kills) a private one. Order of
# preference for the server:
#   1. SHAMAL_TEST_REDIS_URL, if set and answering PING;
#   2. a server already answering PING on 127.0.0.1:6379;
#   3. a project-local server under .deps/redis on port 63799, started with
#      the machine's redis-server, installed from Debian's packages when
#      absent (needs root and apt).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

pong() { # host port
  timeout 2 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "PING\r\n" >&3
    IFS= read -r -t 2 line <&3 || exit 1
    [ "${line%$'"'"'\r'"'"'}" = "+PONG" ]' _ "$1" "$2" 2>/dev/null
}

find_server() {
  if command -v redis-server >/dev/null 2>&1; then command -v redis-server; return; fi
  if [ -x /usr/bin/redis-server ]; then echo /usr/bin/redis-server; fi
}

server_bin="$(find_server || true)"
if [ -z "$server_bin" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-redis: installing redis-server from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq redis-server >&2
    # The package may start a system instance; that one is fine to use too.
    server_bin="$(find_server || true)"
  else
    echo "ensure-redis: redis-server is not installed and cannot be (not root or no apt):" \
      "the async queue's crash test needs it" >&2
  fi
fi

if [ -n "${SHAMAL_TEST_REDIS_URL:-}" ]; then
  hostport="${SHAMAL_TEST_REDIS_URL#*://}"
  hostport="${hostport#*@}"
  hostport="${hostport%%/*}"
  if pong "${hostport%:*}" "${hostport##*:}"; then
    export SHAMAL_TEST_REDIS_URL
    echo "$SHAMAL_TEST_REDIS_URL"
    exit 0
  fi
  echo "ensure-redis: SHAMAL_TEST_REDIS_URL=$SHAMAL_TEST_REDIS_URL does not answer PING; looking elsewhere" >&2
fi

if pong 127.0.0.1 6379; then
  export SHAMAL_TEST_REDIS_URL="redis://127.0.0.1:6379"
  echo "$SHAMAL_TEST_REDIS_URL"
  exit 0
fi

port=63799
data="$root/.deps/redis"
export SHAMAL_TEST_REDIS_URL="redis://127.0.0.1:$port"
if pong 127.0.0.1 "$port"; then
  echo "$SHAMAL_TEST_REDIS_URL"
  exit 0
fi

if [ -z "$server_bin" ]; then
  echo "ensure-redis: no Redis server reachable and no redis-server binary: install redis-server or set SHAMAL_TEST_REDIS_URL" >&2
  exit 1
fi
mkdir -p "$data"
"$server_bin" --port "$port" --bind 127.0.0.1 --dir "$data" \
  --daemonize yes --pidfile "$data/redis.pid" --logfile "$data/redis.log" \
  --save "" --appendonly no >&2
for _ in $(seq 1 100); do
  if pong 127.0.0.1 "$port"; then
    echo "$SHAMAL_TEST_REDIS_URL"
    exit 0
  fi
  sleep 0.1
done
echo "ensure-redis: the project-local redis-server did not answer; see $data/redis.log" >&2
exit 1
