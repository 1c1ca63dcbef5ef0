#!/usr/bin/env bash
# One-run benchmark: raw ONNX Runtime (in process) against the whole stack
# (`shamal up` driven over gRPC by shamal-loadgen), on `demo` and `mlp_large`,
# with the floor beside them: the same session behind a bare loopback socket
# (`ort_raw --loopback`), what any server adds on this machine.
#
#   loadtests/bench.sh
#
# Environment knobs: BENCH_DURATION (10s), BENCH_WARMUP (2s), RAW_DURATION (5s),
# RAW_WARMUP (1s), ORT_INTRA_THREADS (1), HIGH_CONCURRENCY (64), UP_ARGS (extra
# `shamal up` flags, e.g. "--idle-poll-us 500" to measure a setting; for a
# side-by-side comparison of two settings use loadtests/ab-bench.sh).
# Results (JSON per run, summary.json, the server log) go to bench-results/.
set -euo pipefail

# Installs and loads the environment, cds to the repository root, sets
# `repo` and `python`.
# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

duration="${BENCH_DURATION:-10s}"
warmup="${BENCH_WARMUP:-2s}"
raw_duration="${RAW_DURATION:-5s}"
raw_warmup="${RAW_WARMUP:-1s}"
intra="${ORT_INTRA_THREADS:-1}"
high_c="${HIGH_CONCURRENCY:-64}"
read -r -a up_args <<<"${UP_ARGS:-}"
out="$repo/bench-results"
mkdir -p "$out"

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  echo "bench: ORT_DYLIB_PATH is empty; is onnxruntime installed in .deps/venv?" >&2
  exit 1
fi

echo "== building (release)"
cargo build --release -p shamal-cli -p shamal-loadtest
cargo build --release -p shamal-cpu-worker --example ort_raw
bin="${CARGO_TARGET_DIR:-$repo/target}/release"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-bench.XXXXXX")"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== model repository in $tmp"
cp -r models/repository/demo "$tmp/"
"$python" models/generate.py --large "$tmp" >/dev/null
ls "$tmp"

echo "== raw ONNX Runtime (intra threads $intra)"
for model in demo mlp_large; do
  for batch in 1 32; do
    "$bin/examples/ort_raw" --model "$tmp/$model/1/model.onnx" --batch "$batch" \
      --duration "$raw_duration" --warmup "$raw_warmup" --intra-threads "$intra" \
      --json "$out/raw_${model}_b${batch}.json"
    echo
  done
done

# The floor: the same session behind a bare loopback socket served by a
# second thread (no protocol, no queue). What it adds over the raw loop is
# what waking threads and moving bytes costs on this machine, for any server.
echo "== the floor: ONNX Runtime behind a bare loopback socket"
for model in demo mlp_large; do
  "$bin/examples/ort_raw" --model "$tmp/$model/1/model.onnx" --batch 1 --loopback \
    --duration "$raw_duration" --warmup "$raw_warmup" --intra-threads "$intra" \
    --json "$out/floor_${model}_b1.json"
  echo
done

read -r http_port grpc_port metrics_port < <(free_ports 3)

echo "== shamal up (http $http_port, grpc $grpc_port, metrics $metrics_port)"
"$bin/shamal" up --model-repository "$tmp" --http-port "$http_port" \
  --grpc-port "$grpc_port" --metrics-port "$metrics_port" ${up_args[@]+"${up_args[@]}"} \
  >"$out/shamal.log" 2>&1 &
server_pid=$!

ready=""
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$http_port/v2/health/ready" >/dev/null 2>&1; then
    ready=1
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "bench: shamal up exited early; log:" >&2
    tail -n 50 "$out/shamal.log" >&2
    exit 1
  fi
  sleep 0.5
done
if [ -z "$ready" ]; then
  echo "bench: server not ready after 60 s; log:" >&2
  tail -n 50 "$out/shamal.log" >&2
  exit 1
fi
for model in demo mlp_large; do
  for _ in $(seq 1 40); do
    curl -sf "http://127.0.0.1:$http_port/v2/models/$model/ready" >/dev/null 2>&1 && break
    sleep 0.5
  done
done

echo "== stack over gRPC (duration $duration, warmup $warmup)"
for model in demo mlp_large; do
  for c in 1 "$high_c"; do
    "$bin/shamal-loadgen" --url "http://127.0.0.1:$grpc_port" --model "$model" \
      --concurrency "$c" --duration "$duration" --warmup "$warmup" \
      --label "stack $model c=$c" --json "$out/stack_${model}_c${c}.json"
    echo
  done
done

echo "== summary"
# How the host's idle CPUs wait matters at concurrency 1 (operations.md,
# "Idle polling"): record it beside the figures.
export BENCH_CPUIDLE="$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo unknown)"
export BENCH_HALT_POLL_NS="$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a)"
export BENCH_UP_ARGS="${UP_ARGS:-}"
"$python" - "$out" "$high_c" <<'EOF'
import json
import os
import sys
from pathlib import Path

out, high_c = Path(sys.argv[1]), sys.argv[2]
setup = {
    "up_args": os.environ.get("BENCH_UP_ARGS", ""),
    "cpuidle_driver": os.environ.get("BENCH_CPUIDLE", "unknown"),
    "guest_halt_poll_ns": os.environ.get("BENCH_HALT_POLL_NS", "n/a"),
}
print(f"setup: shamal up flags '{setup['up_args']}', cpuidle driver {setup['cpuidle_driver']}, "
      f"guest_halt_poll_ns {setup['guest_halt_poll_ns']}")


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


rows, summary = [], {}
for model in ("demo", "mlp_large"):
    raw1, raw32 = load(f"raw_{model}_b1"), load(f"raw_{model}_b32")
    floor = load(f"floor_{model}_b1")
    s1, sc = load(f"stack_{model}_c1"), load(f"stack_{model}_c{high_c}")
    entry = {
        "raw_p50_us_b1": raw1["p50_us"],
        "stack_p50_us_c1": s1["p50_us"],
        "added_p50_us": s1["p50_us"] - raw1["p50_us"],
        "floor_p50_us": floor["p50_us"],
        "floor_added_p50_us": floor["p50_us"] - raw1["p50_us"],
        f"stack_ips_c{high_c}": sc["ips"],
        "raw_ips_b32": raw32["ips"],
        "ratio": sc["ips"] / raw32["ips"] if raw32["ips"] else 0.0,
        "stack_errors": s1["error_total"] + sc["error_total"],
    }
    summary[model] = entry


def verdict(ok):
    return "ok" if ok else "MISS"


fmt = "{:<34}{:>14}{:>14}"
print(fmt.format("", "demo", "mlp_large"))
d, m = summary["demo"], summary["mlp_large"]
print(fmt.format("raw ORT p50, batch 1 (us)", d["raw_p50_us_b1"], m["raw_p50_us_b1"]))
print(fmt.format("stack p50, c=1 (us)", d["stack_p50_us_c1"], m["stack_p50_us_c1"]))
print(fmt.format("added p50 (us, target <=150)", d["added_p50_us"], m["added_p50_us"]))
print(fmt.format("bare-socket floor p50 (us)", d["floor_p50_us"], m["floor_p50_us"]))
print(fmt.format("floor's added p50 (us)", d["floor_added_p50_us"], m["floor_added_p50_us"]))
print(fmt.format(f"stack inferences/s, c={high_c}",
                 f"{d[f'stack_ips_c{high_c}']:.0f}", f"{m[f'stack_ips_c{high_c}']:.0f}"))
print(fmt.format("raw ORT inferences/s, batch 32", f"{d['raw_ips_b32']:.0f}", f"{m['raw_ips_b32']:.0f}"))
print(fmt.format("ratio stack/raw", f"{d['ratio']:.2f}", f"{m['ratio']:.2f}"))
print(fmt.format("stack errors", d["stack_errors"], m["stack_errors"]))
print()
targets = {
    "added_p50_demo_le_150us": d["added_p50_us"] <= 150,
    "added_p50_mlp_large_le_150us": m["added_p50_us"] <= 150,
    "mlp_large_ratio_ge_0.8": m["ratio"] >= 0.8,
    f"demo_c{high_c}_ge_10000_ips": d[f"stack_ips_c{high_c}"] >= 10000,
}
for name, ok in targets.items():
    print(f"  {verdict(ok):<5} {name}")
summary["targets"] = targets
summary["setup"] = setup
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\nJSON results in {out}/")
EOF
