#!/usr/bin/env bash
# Runs Triton's own perf_analyzer briefly against a running Shamal stack.
#
#   SHAMAL_GRPC_URL=127.0.0.1:18001 [SHAMAL_HTTP_URL=127.0.0.1:18000] \
#     tests/compat/perf_analyzer.sh
#
# Installs perf_analyzer first if needed (scripts/install-perf-analyzer.sh).
# gRPC: model demo, batch 1, concurrency 1 and 3, 1 s measurement windows.
# HTTP (only when SHAMAL_HTTP_URL is set): concurrency 1.
# Exits non-zero when perf_analyzer exits non-zero, prints an error, or
# reports no throughput. Takes about 10-25 s.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
model="${PERF_MODEL:-demo}"

if [ -z "${SHAMAL_GRPC_URL:-}" ]; then
  echo "perf_analyzer.sh: SHAMAL_GRPC_URL is not set (e.g. 127.0.0.1:18001); start the Shamal stack first" >&2
  exit 2
fi

pa="$(bash "$root/scripts/install-perf-analyzer.sh")" || {
  echo "perf_analyzer.sh: installing perf_analyzer failed" >&2
  exit 1
}

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT
failures=0

# run NAME ARGS...: one perf_analyzer run, judged on exit code and output.
run() {
  local name="$1"
  shift
  local log="$log_dir/$name.log"
  echo "=== perf_analyzer ($name): $*"
  local rc=0
  timeout 60 "$pa" "$@" >"$log" 2>&1 || rc=$?
  cat "$log"
  if [ "$rc" -ne 0 ]; then
    echo "perf_analyzer.sh: FAIL ($name): perf_analyzer exited with $rc" >&2
    failures=$((failures + 1))
    return 0
  fi
  if grep -qiE '(^|[^a-z_])(error|failed)([^a-z_]|$)' "$log"; then
    echo "perf_analyzer.sh: FAIL ($name): perf_analyzer reported errors:" >&2
    grep -iE '(^|[^a-z_])(error|failed)([^a-z_]|$)' "$log" >&2
    failures=$((failures + 1))
    return 0
  fi
  if ! grep -qE 'Throughput: [0-9.]+ infer/sec' "$log"; then
    echo "perf_analyzer.sh: FAIL ($name): no throughput reported" >&2
    failures=$((failures + 1))
    return 0
  fi
  echo "perf_analyzer.sh: ok ($name)"
}

common=(-m "$model" -b 1 --measurement-interval 1000 --stability-percentage 100 --max-trials 6)

run grpc -i grpc -u "$SHAMAL_GRPC_URL" "${common[@]}" --concurrency-range 1:4:2

if [ -n "${SHAMAL_HTTP_URL:-}" ]; then
  run http -i http -u "$SHAMAL_HTTP_URL" "${common[@]}" --concurrency-range 1:1
else
  echo "perf_analyzer.sh: SHAMAL_HTTP_URL not set; HTTP run not done"
fi

if [ "$failures" -ne 0 ]; then
  echo "perf_analyzer.sh: $failures run(s) failed" >&2
  exit 1
fi
echo "perf_analyzer.sh: all runs passed"
