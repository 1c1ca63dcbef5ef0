#!/usr/bin/env bash
# Rollout benchmark: registry, cpu-worker(s) and router as separate processes
# on loopback (release build), then
#   1. propagation: time from a rollout write at the registry's REST API to
#      the router answering every request with the new version (200 canary
#      flips between weight 100 and 0; p50/p90/p99/max);
#   2. router throughput at concurrency 64: one version without rollout vs.
#      a rollout splitting 34/33/33 over three versions, alternately.
#
#   loadtests/rollout-bench.sh                      # SQLite in a temp dir
#   loadtests/rollout-bench.sh --postgres postgres://postgres@127.0.0.1:5432/postgres
#                                                   # a fresh database on that
#                                                   # server, dropped after
#   loadtests/rollout-bench.sh --database-url URL   # that database as is
#                                                   # (use a dedicated one)
#
# Other flags go to shamal-rollout-bench (--changes, --write policy,
# --runs, --duration, --warmup, --concurrency, ...; see its --help), e.g.
#   loadtests/rollout-bench.sh --workers 3 --placement weighted
# three cpu-workers, the throughput models placed by traffic weight (each
# version on workers of its own) before the runs; --placement all (the
# default) has every worker hold every version.
# The JSON of every figure goes to bench-results/rollout.json, the services'
# logs to bench-results/rollout-logs/ (--json and --log-dir override).
set -euo pipefail

# Installs and loads the environment, cds to the repository root, sets
# `repo` and `python`.
# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  echo "rollout-bench: ORT_DYLIB_PATH is empty; is onnxruntime installed in .deps/venv?" >&2
  exit 1
fi

postgres_admin=""
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --postgres)
      postgres_admin="${2:?--postgres needs the URL of an existing database, e.g. postgres://postgres@127.0.0.1:5432/postgres}"
      shift 2
      ;;
    *)
      pass+=("$1")
      shift
      ;;
  esac
done

out="$repo/bench-results"
mkdir -p "$out/rollout-logs"

echo "== building (release)"
cargo build --release -p shamal-registry -p shamal-cpu-worker -p shamal-router -p shamal-loadtest

fresh_db=""
cleanup() {
  if [ -n "$fresh_db" ]; then
    psql "$postgres_admin" -qc "DROP DATABASE IF EXISTS $fresh_db WITH (FORCE)" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if [ -n "$postgres_admin" ]; then
  fresh_db="shamal_rollout_bench_$$"
  psql "$postgres_admin" -qc "CREATE DATABASE $fresh_db" >/dev/null
  pass+=(--database-url "${postgres_admin%/*}/$fresh_db")
fi

cmd=(target/release/shamal-rollout-bench --log-dir "$out/rollout-logs" --json "$out/rollout.json" "${pass[@]}")
echo "== ${cmd[*]}"
"${cmd[@]}"
