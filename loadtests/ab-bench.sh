#!/usr/bin/env bash
# Interleaved A/B comparison of two `shamal up` settings on one machine.
# Both stacks run side by side; each round drives one, then the other, with
# `shamal-loadgen` (the order alternates between rounds), so that the slow
# and fast spells of a shared VM fall on both alike. Each round also runs
# the raw ONNX Runtime loop on `mlp_large` as a reference.
#
#   A_ARGS="--inline-max-us 100" B_ARGS="" loadtests/ab-bench.sh
#   A_BIN=/path/to/old/target/release/shamal loadtests/ab-bench.sh   # before/after
#
#   A_ARGS="--oidc-issuer $ISSUER --oidc-audience shamal" A_TOKEN="$token" \
#     loadtests/ab-bench.sh                       # auth on (A) against off (B)
#
# Environment: A_ARGS, B_ARGS (extra `shamal up` flags of each side),
# A_TOKEN, B_TOKEN (a bearer token each side's load generator and readiness
# probe send, for a side with auth on),
# A_BIN, B_BIN (the `shamal` binary of each side, default this tree's release
# build: a binary built from another commit compares two versions),
# ROUNDS (4), AB_DURATION (4s), AB_WARMUP (1s), AB_CASES (the cases below,
# space-separated: mlp_large:1 demo:1 mixed mlp_large:64 demo:64).
# "mixed" measures `demo` at concurrency 1 while `mlp_large` runs at
# concurrency 1 beside it. Prints one line per case and side per round;
# reports go to bench-results/ab/.
set -euo pipefail

# Installs and loads the environment, cds to the repository root, sets
# `repo` and `python`.
# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

read -r -a a_args <<<"${A_ARGS:-}"
read -r -a b_args <<<"${B_ARGS:-}"
rounds="${ROUNDS:-4}"
duration="${AB_DURATION:-4s}"
warmup="${AB_WARMUP:-1s}"
read -r -a cases <<<"${AB_CASES:-mlp_large:1 demo:1 mixed mlp_large:64 demo:64}"
out="$repo/bench-results/ab"
mkdir -p "$out"

cargo build --release -p shamal-cli -p shamal-loadtest
cargo build --release -p shamal-cpu-worker --example ort_raw
bin="${CARGO_TARGET_DIR:-$repo/target}/release"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-ab.XXXXXX")"
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
"$python" models/generate.py --large "$tmp" >/dev/null

declare -A grpc
declare -A token=([A]="${A_TOKEN:-}" [B]="${B_TOKEN:-}")
start_side() {
  local side="$1"
  shift
  local http g metrics reg_http reg_grpc audit_grpc batch_grpc batch_http
  read -r http g metrics reg_http reg_grpc audit_grpc batch_grpc batch_http < <(free_ports 8)
  local shamal="$bin/shamal"
  if [ "$side" = A ] && [ -n "${A_BIN:-}" ]; then shamal="$A_BIN"; fi
  if [ "$side" = B ] && [ -n "${B_BIN:-}" ]; then shamal="$B_BIN"; fi
  # Two stacks side by side need two audit ports; a binary from before the
  # audit service has no such flag.
  local audit_flag=()
  if "$shamal" up --help | grep -q -- --audit-grpc-port; then
    audit_flag=(--audit-grpc-port "$audit_grpc")
  fi
  # Likewise the batch coordinator's two ports.
  if "$shamal" up --help | grep -q -- --batch-grpc-port; then
    audit_flag+=(--batch-grpc-port "$batch_grpc" --batch-http-port "$batch_http")
  fi
  "$shamal" up --model-repository "$tmp" --http-port "$http" --grpc-port "$g" \
    --metrics-port "$metrics" --registry-http-port "$reg_http" \
    --registry-grpc-port "$reg_grpc" "${audit_flag[@]}" --data-dir "$tmp/data_$side" "$@" \
    >"$out/server_$side.log" 2>&1 &
  pids+=("$!")
  grpc[$side]="$g"
}
start_side A ${a_args[@]+"${a_args[@]}"}
start_side B ${b_args[@]+"${b_args[@]}"}
for side in A B; do
  for _ in $(seq 1 120); do
    if "$python" - "${grpc[$side]}" "${token[$side]}" <<'EOF' 2>/dev/null; then break; fi
import sys, tritonclient.grpc as g
c = g.InferenceServerClient(f"127.0.0.1:{sys.argv[1]}")
h = {"authorization": f"Bearer {sys.argv[2]}"} if sys.argv[2] else None
sys.exit(0 if c.is_model_ready("demo", headers=h) and c.is_model_ready("mlp_large", headers=h) else 1)
EOF
    sleep 0.5
  done
done
echo "A: ${A_BIN:-$bin/shamal} ${A_ARGS:-(defaults)}  B: ${B_BIN:-$bin/shamal} ${B_ARGS:-(defaults)}"

load() { # side model concurrency json
  SHAMAL_TOKEN="${token[$1]}" "$bin/shamal-loadgen" --url "http://127.0.0.1:${grpc[$1]}" --model "$2" \
    --concurrency "$3" --duration "$duration" --warmup "$warmup" --json "$4" >/dev/null
}
figures() { # json
  "$python" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"p50 {r['p50_us']:>6} us  p99 {r['p99_us']:>6} us  {r['ips']:>9.0f} inf/s  errors {r.get('error_total', 0)}")
EOF
}

for round in $(seq 1 "$rounds"); do
  raw="$out/raw_r$round.json"
  "$bin/examples/ort_raw" --model "$tmp/mlp_large/1/model.onnx" --batch 1 --duration 3s \
    --warmup 1s --json "$raw" >/dev/null
  echo "round $round  raw ORT mlp_large b1: $(figures "$raw")"
  if ((round % 2)); then order="A B"; else order="B A"; fi
  for case in "${cases[@]}"; do
    for side in $order; do
      json="$out/${case/:/_c}_${side}_r$round.json"
      if [ "$case" = mixed ]; then
        load "$side" mlp_large 1 "$out/mixed_bg_${side}_r$round.json" &
        background=$!
        load "$side" demo 1 "$json"
        wait "$background"
      else
        load "$side" "${case%%:*}" "${case##*:}" "$json"
      fi
      printf 'round %s  %-13s %s: %s\n' "$round" "$case" "$side" "$(figures "$json")"
    done
  done
done
