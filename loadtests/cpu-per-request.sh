#!/usr/bin/env bash
# CPU time per inference of two `shamal up` settings at the same open-loop
# rate: what a feature costs the stack, unlike a closed-loop throughput
# ratio, hardly moved by what else runs on the machine. Both stacks run side
# by side; each round drives one, then the other, at RATE arrivals/s for 5 s
# and reads the `shamal up` process's CPU time (user + system, all threads)
# before and after.
#
#   A_ARGS="--no-gpu-worker" B_ARGS="--no-gpu-worker --no-audit" \
#     loadtests/cpu-per-request.sh          # the audit trail's cost, all in one
#
# Environment: A_ARGS, B_ARGS (extra `shamal up` flags of each side), RATE
# (8000), ROUNDS (3). Prints one line per side per round.
set -euo pipefail

# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

read -r -a a_args <<<"${A_ARGS:-}"
read -r -a b_args <<<"${B_ARGS:-}"
rate="${RATE:-8000}"
rounds="${ROUNDS:-3}"
cargo build --release -p shamal-cli -p shamal-loadtest
bin="${CARGO_TARGET_DIR:-$repo/target}/release"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-cpu.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
cp -r models/repository/demo "$tmp/"

declare -A pid grpc
start_side() {
  local side="$1"
  shift
  local http g metrics reg_http reg_grpc audit_grpc batch_grpc batch_http
  read -r http g metrics reg_http reg_grpc audit_grpc batch_grpc batch_http < <(free_ports 8)
  # Side by side, each stack needs its own ports for every service it embeds.
  local extra=(--audit-grpc-port "$audit_grpc")
  if "$bin/shamal" up --help | grep -q -- --batch-grpc-port; then
    extra+=(--batch-grpc-port "$batch_grpc" --batch-http-port "$batch_http")
  fi
  "$bin/shamal" up --model-repository "$tmp" --http-port "$http" --grpc-port "$g" \
    --metrics-port "$metrics" --registry-http-port "$reg_http" --registry-grpc-port "$reg_grpc" \
    "${extra[@]}" --data-dir "$tmp/data_$side" "$@" >"$tmp/server_$side.log" 2>&1 &
  pid[$side]="$!"
  pids+=("$!")
  grpc[$side]="$g"
}
start_side A ${a_args[@]+"${a_args[@]}"}
start_side B ${b_args[@]+"${b_args[@]}"}
for side in A B; do
  for _ in $(seq 1 120); do
    if "$bin/shamal-loadgen" --url "http://127.0.0.1:${grpc[$side]}" --model demo \
      --duration 200ms --warmup 0s >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
done
echo "A: ${A_ARGS:-(defaults)}  B: ${B_ARGS:-(defaults)}  open loop at $rate/s"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_s="$(getconf CLK_TCK)"
for round in $(seq 1 "$rounds"); do
  for side in A B; do
    load=(--url "http://127.0.0.1:${grpc[$side]}" --model demo --rate "$rate" --warmup 0s)
    "$bin/shamal-loadgen" "${load[@]}" --duration 1s >/dev/null
    before="$(cpu_ticks "${pid[$side]}")"
    "$bin/shamal-loadgen" "${load[@]}" --duration 5s --json "$tmp/report.json" >/dev/null
    after="$(cpu_ticks "${pid[$side]}")"
    "$python" - "$tmp/report.json" "$before" "$after" "$ticks_per_s" "$round" "$side" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
cpu_s = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
served = report["ips"] * 5
print(f"round {sys.argv[5]} {sys.argv[6]}: {report['ips']:>7.0f} inf/s  p50 {report['p50_us']:>6} us  "
      f"p99 {report['p99_us']:>6} us  shamal up CPU {cpu_s:.2f} s = {cpu_s / served * 1e6:5.1f} us/inference")
PY
  done
done
