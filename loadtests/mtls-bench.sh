#!/usr/bin/env bash
# TLS on vs off between separate processes: a router in front of one
# cpu-worker, both plaintext (`--insecure`), against both with TLS (the
# router's public port TLS, router -> worker mTLS, development certificates
# from `shamal certs init`). The load generator presents the batch
# coordinator's certificate to the TLS router (a service allowed to call
# models), so every request crosses two TLS hops. Both stacks run side by
# side; each round drives one, then the other (the order alternates), on
# `demo` at concurrency 1 and 64.
#
#   loadtests/mtls-bench.sh
#
# Environment: ROUNDS (4), MTLS_DURATION (4s), MTLS_WARMUP (1s).
# Reports go to bench-results/mtls/.
set -euo pipefail

# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rounds="${ROUNDS:-4}"
duration="${MTLS_DURATION:-4s}"
warmup="${MTLS_WARMUP:-1s}"
out="$repo/bench-results/mtls"
mkdir -p "$out"

cargo build --release -p shamal-cli -p shamal-loadtest -p shamal-router -p shamal-cpu-worker
bin="${CARGO_TARGET_DIR:-$repo/target}/release"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-mtls.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

mkdir -p "$tmp/repo"
cp -r models/repository/demo "$tmp/repo/"
"$bin/shamal" certs init --dir "$tmp/certs" >/dev/null
tls_of() { # service
  echo --tls-cert "$tmp/certs/$1.pem" --tls-key "$tmp/certs/$1-key.pem" --tls-ca "$tmp/certs/ca.pem"
}

wait_http() {
  for _ in $(seq 1 600); do
    if curl -fs "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

declare -A router_grpc
start_side() { # side: plain | tls
  local side="$1" wgrpc wmetrics rgrpc rhttp rmetrics worker_sec router_sec
  read -r wgrpc wmetrics rgrpc rhttp rmetrics < <(free_ports 5)
  if [ "$side" = tls ]; then
    read -r -a worker_sec <<<"$(tls_of worker)"
    # The router's TLS without OIDC: started insecure, so that only TLS is
    # measured (callers are identified by certificate, the loadgen's is a
    # batch coordinator's).
    read -r -a router_sec <<<"--insecure $(tls_of router)"
  else
    worker_sec=(--insecure)
    router_sec=(--insecure)
  fi
  RUST_LOG=warn "$bin/shamal-cpu-worker" "${worker_sec[@]}" --model-repository "$tmp/repo" \
    --grpc-listen "127.0.0.1:$wgrpc" --metrics-listen "127.0.0.1:$wmetrics" \
    --instances 1 --intra-threads 1 >"$out/worker_$side.log" 2>&1 &
  pids+=("$!")
  wait_http "http://127.0.0.1:$wmetrics/health/ready"
  RUST_LOG=warn "$bin/shamal-router" "${router_sec[@]}" --worker "127.0.0.1:$wgrpc" \
    --grpc-listen "127.0.0.1:$rgrpc" --http-listen "127.0.0.1:$rhttp" \
    --metrics-listen "127.0.0.1:$rmetrics" >"$out/router_$side.log" 2>&1 &
  pids+=("$!")
  wait_http "http://127.0.0.1:$rmetrics/health/ready"
  router_grpc[$side]="$rgrpc"
}
start_side plain
start_side tls

load() { # side concurrency json
  local target=(--url "http://127.0.0.1:${router_grpc[$1]}")
  if [ "$1" = tls ]; then
    read -r -a target <<<"--url https://localhost:${router_grpc[$1]} $(tls_of batch)"
  fi
  "$bin/shamal-loadgen" "${target[@]}" --model demo --concurrency "$2" \
    --duration "$duration" --warmup "$warmup" --json "$3" >/dev/null
}
figures() { # json
  "$python" - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"p50 {r['p50_us']:>6} us  p99 {r['p99_us']:>6} us  {r['ips']:>9.0f} inf/s  errors {r.get('error_total', 0)}")
PY
}

for round in $(seq 1 "$rounds"); do
  if ((round % 2)); then order="plain tls"; else order="tls plain"; fi
  for concurrency in 1 64; do
    for side in $order; do
      json="$out/${side}_c${concurrency}_r$round.json"
      load "$side" "$concurrency" "$json"
      printf 'round %s  demo c=%-3s %-5s %s\n' "$round" "$concurrency" "$side" "$(figures "$json")"
    done
  done
done

"$python" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(side, c):
    return [json.load(open(f"{out}/{side}_c{c}_r{r}.json")) for r in range(1, rounds + 1)]
for c in (1, 64):
    plain, tls = runs("plain", c), runs("tls", c)
    p50 = [t["p50_us"] - p["p50_us"] for p, t in zip(plain, tls)]
    ratio = [t["ips"] / p["ips"] for p, t in zip(plain, tls)]
    print(f"demo c={c}: TLS adds p50 {statistics.median(p50):.0f} us (rounds {p50}); "
          f"throughput TLS/plain {statistics.median(ratio):.3f} (rounds {[round(x, 3) for x in ratio]})")
PY
