#!/usr/bin/env bash
# Scale-out and overload benchmark with real processes on loopback: one
# router (release build) in front of 1, 2 and 4 cpu-worker processes.
#
#   loadtests/scale-bench.sh
#
# Prints and writes to bench-results/scale/:
#   - throughput and p99 at 1, 2 and 4 workers (closed loop, concurrency 64)
#     for demo and mlp_large, and the scaling factor against 1 worker;
#   - open-loop overload at 1.5x and 3x the 2-worker capacity of mlp_large:
#     goodput, p99 of admitted requests, rejection latency, router memory;
#   - time to route around a worker killed with SIGKILL under load.
#
# Environment knobs: BENCH_DURATION (10s), BENCH_WARMUP (2s),
# ROUTER_MAX_INFLIGHT (32: the router's admission bound in the overload runs),
# WORKER_NICE (0: the workers' nice level; 10 models workers on hosts of
# their own, where their compute cannot delay the router's answers),
# SCALE_BENCH_PARTS (scaling,overload,kill: which parts to run).
set -euo pipefail

# Installs and loads the environment, cds to the repository root, sets
# `repo` and `python`.
# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

duration="${BENCH_DURATION:-10s}"
warmup="${BENCH_WARMUP:-2s}"
max_inflight="${ROUTER_MAX_INFLIGHT:-32}"
worker_nice="${WORKER_NICE:-0}"
parts=",${SCALE_BENCH_PARTS:-scaling,overload,kill},"
part() { [[ "$parts" == *",$1,"* ]]; }
out="$repo/bench-results/scale"
mkdir -p "$out"

echo "== building (release)"
cargo build --release -p shamal-router -p shamal-cpu-worker -p shamal-loadtest
bin="${CARGO_TARGET_DIR:-$repo/target}/release"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-scale.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

mkdir -p "$tmp/repo"
cp -r models/repository/demo "$tmp/repo/"
"$python" models/generate.py --large "$tmp/repo" >/dev/null

wait_http() {
  for _ in $(seq 1 600); do
    if curl -fs "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

worker_pids=()
worker_addresses=()
start_workers() {
  worker_pids=()
  worker_addresses=()
  for _ in $(seq 1 "$1"); do
    local grpc metrics
    read -r grpc metrics < <(free_ports 2)
    RUST_LOG=warn nice -n "$worker_nice" "$bin/shamal-cpu-worker" --insecure --model-repository "$tmp/repo" \
      --grpc-listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
      --instances 1 --intra-threads 1 >"$out/worker-$grpc.log" 2>&1 &
    worker_pids+=("$!")
    pids+=("$!")
    worker_addresses+=("127.0.0.1:$grpc")
    wait_http "http://127.0.0.1:$metrics/health/ready"
  done
}

router_pid=""
router_grpc=""
router_log=""
start_router() {
  local http metrics workers
  read -r router_grpc http metrics < <(free_ports 3)
  workers="$(IFS=,; echo "${worker_addresses[*]}")"
  router_log="$out/router-$router_grpc.log"
  RUST_LOG=info "$bin/shamal-router" --insecure --worker "$workers" \
    --grpc-listen "127.0.0.1:$router_grpc" --http-listen "127.0.0.1:$http" \
    --metrics-listen "127.0.0.1:$metrics" --max-inflight "$1" \
    --refresh-interval-ms 200 >"$router_log" 2>&1 &
  router_pid="$!"
  pids+=("$router_pid")
  wait_http "http://127.0.0.1:$http/v2/health/ready"
}

stop_all() {
  for pid in "$router_pid" "${worker_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

rss_kib() {
  awk '/VmRSS/ {print $2}' "/proc/$1/status"
}

loadgen() {
  "$bin/shamal-loadgen" --url "http://127.0.0.1:$router_grpc" "$@"
}

if part scaling; then
echo "== scaling: 1, 2 and 4 workers, closed loop at concurrency 64"
for workers in 1 2 4; do
  start_workers "$workers"
  start_router 4096
  for model in demo mlp_large; do
    loadgen --model "$model" --concurrency 64 --duration "$duration" --warmup "$warmup" \
      --label "$model, $workers worker(s), c=64" --json "$out/scale-$model-$workers.json"
  done
  stop_all
done
fi

if part overload; then
echo "== overload: mlp_large on 2 workers, open loop at 1.5x and 3x capacity"
start_workers 2
start_router "$max_inflight"
# Capacity: closed loop just under the router's bound for normal-priority
# requests (90% of max_inflight; the rest is reserved for high priority).
# At or above it, callers are refused and retry at once, and the refusals
# eat the CPU the measurement is about.
capacity_concurrency=$((max_inflight * 3 / 4))
loadgen --model mlp_large --concurrency "$capacity_concurrency" --duration "$duration" --warmup "$warmup" \
  --label "capacity (closed loop, c=$capacity_concurrency)" --json "$out/capacity.json"
capacity="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["rps"])' "$out/capacity.json")"
rss_before="$(rss_kib "$router_pid")"
for factor in 1.5 3; do
  rate="$("$python" -c "print(round($capacity * $factor))")"
  loadgen --model mlp_large --rate "$rate" --max-outstanding 4096 --timeout 2s \
    --duration "$duration" --warmup "$warmup" \
    --label "overload ${factor}x (rate $rate/s)" --json "$out/overload-$factor.json"
done
rss_after="$(rss_kib "$router_pid")"
echo "router RSS: ${rss_before} KiB before overload, ${rss_after} KiB after" | tee "$out/router-rss.txt"
stop_all
fi

if part kill; then
echo "== route around a killed worker: demo on 2 workers, open loop, SIGKILL after 3 s"
start_workers 2
start_router 4096
loadgen --model demo --rate 2000 --timeout 2s --duration 8s --warmup 1s \
  --label "demo at 2000/s, one worker killed" --json "$out/kill.json" &
loadgen_pid="$!"
sleep 4
killed_at="$(date +%s.%N)"
kill -9 "${worker_pids[0]}"
wait "$loadgen_pid"
"$python" - "$router_log" "$killed_at" "${worker_addresses[0]}" <<'EOF' | tee "$out/route-around.txt"
import datetime, re, sys
log, killed_at, address = sys.argv[1], float(sys.argv[2]), sys.argv[3]
ansi = re.compile(r"\x1b\[[0-9;]*m")
for line in open(log, errors="replace"):
    line = ansi.sub("", line)
    if address in line and ("unhealthy" in line or "trying another" in line or "ejected" in line):
        stamp = line.split()[0]
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        print(f"routed around the killed worker {1000 * (when - killed_at):.1f} ms after SIGKILL ({line.strip()[:120]})")
        break
else:
    print("no routing-around event found in the router log")
EOF
stop_all
fi

echo "== summary"
"$python" - "$out" <<'EOF' | tee "$out/summary.txt"
import json, sys, os
out = sys.argv[1]
def load(name):
    return json.load(open(os.path.join(out, name)))
def have(name):
    return os.path.exists(os.path.join(out, name))
if have("scale-demo-1.json"):
    print("| model | workers | throughput (inf/s) | p99 (µs) | scaling vs 1 worker |")
    print("|---|---|---|---|---|")
    for model in ("demo", "mlp_large"):
        base = load(f"scale-{model}-1.json")["ips"]
        for workers in (1, 2, 4):
            r = load(f"scale-{model}-{workers}.json")
            print(f"| {model} | {workers} | {r['ips']:,.0f} | {r['p99_us']:,} | {r['ips'] / base:.2f} |")
if have("capacity.json"):
    cap = load("capacity.json")
    print()
    print(f"capacity (mlp_large, 2 workers, closed loop at c={cap['concurrency']}): {cap['ips']:,.0f} inf/s, "
          f"p99 {cap['p99_us']:,} µs, {cap['error_total']:,} refused")
    print("| offered | goodput (inf/s) | admitted p50 / p99 (µs) | rejected | rejection p50 / p99 / max (µs) | from send: p50 / p99 / max (µs) | other errors |")
    print("|---|---|---|---|---|---|---|")
    for factor in ("1.5", "3"):
        r = load(f"overload-{factor}.json")
        rejected = r["errors"].get("ResourceExhausted", 0)
        other = r["error_total"] - rejected
        print(f"| {factor}x ({r['rate']:,.0f}/s) | {r['ips']:,.0f} | {r['p50_us']:,} / {r['p99_us']:,} | {rejected:,} | {r['rejected_p50_us']:,} / {r['rejected_p99_us']:,} / {r['rejected_max_us']:,} | {r['rejected_from_send_p50_us']:,} / {r['rejected_from_send_p99_us']:,} / {r['rejected_from_send_max_us']:,} | {other} |")
if have("kill.json"):
    k = load("kill.json")
    print()
    print(f"kill -9 under 2000/s: {k['ok']:,} ok, errors {k['errors'] or 'none'}, p99 {k['p99_us']:,} µs, max {k['max_us']:,} µs")
EOF
