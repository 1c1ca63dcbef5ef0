#!/usr/bin/env bash
# Makes an S3-compatible server reachable for the test suite (the batch
# inference tests read datasets from and write outputs to it) and prints its
# endpoint URL (last line of stdout). The server is moto in server mode
# (PyPI moto[server], pinned in scripts/requirements.txt and installed into
# .deps/venv by scripts/setup-deps.sh). It accepts any credentials and keeps
# everything in memory. Order of preference:
#   1. SHAMAL_TEST_S3_ENDPOINT, if set and answering;
#   2. the project-local moto on http://127.0.0.1:$SHAMAL_S3_PORT (default
#      63900), if already answering;
#   3. that moto, started here in the background (pid and log in .deps/s3/).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

data="$root/.deps/s3"
port="${SHAMAL_S3_PORT:-63900}"
venv_python="$root/.deps/venv/bin/python"

# Whether an S3 endpoint answers a ListBuckets (any HTTP answer from moto).
answers() { # endpoint
  python3 - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/", timeout=2)
except urllib.error.HTTPError:
    pass  # an answer all the same (403 from a real S3 without credentials)
sys.exit(0)
EOF
}

if [ -n "${SHAMAL_TEST_S3_ENDPOINT:-}" ]; then
  if answers "$SHAMAL_TEST_S3_ENDPOINT"; then
    echo "$SHAMAL_TEST_S3_ENDPOINT"
    exit 0
  fi
  echo "ensure-s3: SHAMAL_TEST_S3_ENDPOINT=$SHAMAL_TEST_S3_ENDPOINT does not answer; looking elsewhere" >&2
fi

endpoint="http://127.0.0.1:$port"
if answers "$endpoint"; then
  echo "$endpoint"
  exit 0
fi

if [ ! -x "$venv_python" ] || ! "$venv_python" -c 'import moto.server' 2>/dev/null; then
  echo "ensure-s3: installing moto[server] into .deps/venv (scripts/setup-deps.sh)" >&2
  scripts/setup-deps.sh >&2
fi
if ! "$venv_python" -c 'import moto.server' 2>/dev/null; then
  echo "ensure-s3: moto is not installed in .deps/venv; run scripts/setup-deps.sh" >&2
  exit 1
fi

mkdir -p "$data"
pid_file="$data/moto-$port.pid"
log="$data/moto-$port.log"
if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "ensure-s3: moto (pid $(cat "$pid_file")) runs but does not answer yet; waiting" >&2
else
  nohup "$venv_python" -m moto.server -H 127.0.0.1 -p "$port" >"$log" 2>&1 </dev/null &
  echo $! >"$pid_file"
fi
for _ in $(seq 1 150); do
  if answers "$endpoint"; then
    echo "$endpoint"
    exit 0
  fi
  if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "ensure-s3: moto exited; see $log:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "ensure-s3: moto did not answer on $endpoint; see $log" >&2
exit 1
