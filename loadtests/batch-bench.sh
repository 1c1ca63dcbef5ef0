#!/usr/bin/env bash
# Batch inference benchmark (issue 17): rows/s of batch jobs against the
# same model run in process in a tight loop, with 1 and 2 batch workers,
# and online p99 on `demo` with and without a batch job running.
#
#   BIN_DIR=/work/bench-target/release loadtests/batch-bench.sh
#   ROWS=200000 SENTENCES=20000 STAGES="inproc up" loadtests/batch-bench.sh
#
# Data (generated once with the venv's pyarrow, cached by size under
# BENCH_DATA, default /tmp/shamal-batch-bench-data): ROWS tabular rows
# (`id` int64 + `INPUT0` fixed-size list of 16 float32, demo's input) and
# SENTENCES sentences (`id` + `text`, the text encoder's input), in row
# groups of 10,000 rows (a shard is a run of whole row groups).
#
# Stages (STAGES, space-separated; default all):
#   inproc  the in-process baselines: services/cpu-worker/examples/batch_inproc
#           (ONNX Runtime over the Parquet file, as the worker builds its
#           session) and services/gpu-worker/examples/batch_encoder_inproc
#           (the gpu-worker's candle text backend); batch 1024 on one thread
#           (the reference of the ratio), plus variants that say where time
#           goes (with the output written, at the batch the worker uses, on
#           both cores), and two loops at once over halves of the file,
#           each writing its part (`--parallel 2`: the floor of 2 workers).
#   up      `shamal up` (embedded coordinator, in-process queue, the
#           embedded cpu-worker's / gpu-worker's batch role = 1 worker):
#           `shamal batch submit --wait`, rows / wall time from submit to
#           manifest.
#   procs   the production layout: `shamal-batch` (SQLite, Redis queue)
#           with 1, then 2 `shamal-cpu-worker` / `shamal-gpu-worker`
#           processes with the batch role (the models pushed to `shamal
#           up`'s registry, which the coordinator asks; the router's
#           ModelMetadata checks the inputs).
#   floor   where a job's time goes, on `shamal up`'s 1 worker: a job of
#           one 10,000-row row group (the fixed cost of a job), the ROWS
#           as one shard and as shards of ROWS_PER_SHARD (the cost of a
#           shard), and the worker's own shard time
#           (shamal_worker_batch_shard_duration_seconds) against the
#           job's wall time.
#   online  `shamal-loadgen` on `demo` through `shamal up` at ONLINE_RATE
#           requests/s (open loop) for ONLINE_DURATION, without, then with
#           batch jobs of `demo` running back to back on the same stack.
#
# Environment: BIN_DIR (release binaries; default $CARGO_TARGET_DIR or
# target, /release), ROWS (1000000), SENTENCES (100000), ROWS_PER_SHARD
# (100000), TEXT_ROWS_PER_SHARD (10000), ENCODER (1: also the text encoder; 0: tabular only),
# ONLINE_RATE (200), ONLINE_DURATION (20s), ROUNDS (in-process passes, 3),
# JOBS (measured jobs per up/procs case after a first one, 3),
# UP_ARGS (extra `shamal up` flags). Results: bench-results/batch/.
set -euo pipefail

# shellcheck source=loadtests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bin="${BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}"
rows="${ROWS:-1000000}"
sentences="${SENTENCES:-100000}"
rows_per_shard="${ROWS_PER_SHARD:-100000}"
# Sentences are ~10x slower a row: smaller shards, so that two workers
# have shards to share (a shard is at least one 10,000-row row group).
text_rows_per_shard="${TEXT_ROWS_PER_SHARD:-10000}"
encoder="${ENCODER:-1}"
online_rate="${ONLINE_RATE:-200}"
online_duration="${ONLINE_DURATION:-20s}"
rounds="${ROUNDS:-3}"
jobs_per_case="${JOBS:-3}"
read -r -a stages <<<"${STAGES:-inproc up procs floor online}"
read -r -a up_args <<<"${UP_ARGS:-}"
data="${BENCH_DATA:-${TMPDIR:-/tmp}/shamal-batch-bench-data}"
out="$repo/bench-results/batch"
mkdir -p "$out" "$data"
results="$out/results.tsv"
: >"$results"

needed=(shamal shamal-loadgen shamal-batch shamal-cpu-worker examples/batch_inproc)
if [ "$encoder" = 1 ]; then
  needed+=(shamal-gpu-worker examples/batch_encoder_inproc)
fi
for binary in "${needed[@]}"; do
  if [ ! -x "$bin/$binary" ]; then
    echo "batch-bench: $bin/$binary is missing: build with" >&2
    echo "  cargo build --release -p shamal-cli -p shamal-loadtest -p shamal-cpu-worker" \
      "-p shamal-gpu-worker -p shamal-batch-coordinator --examples --bins" >&2
    exit 1
  fi
done
has_stage() { [[ " ${stages[*]} " == *" $1 "* ]]; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/shamal-batch-bench.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---------------------------------------------------------------- data --
tab="$data/rows-$rows.parquet"
txt="$data/sentences-$sentences.parquet"
"$python" - "$tab" "$rows" "$txt" "$sentences" "$encoder" <<'PY'
import os, sys
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

tab, rows, txt, sentences, encoder = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
rng = np.random.default_rng(17)
if not os.path.exists(tab):
    values = rng.standard_normal(rows * 16, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), 16)
    table = pa.table({"id": pa.array(np.arange(rows, dtype=np.int64)), "INPUT0": column})
    pq.write_table(table, tab + ".tmp", row_group_size=10_000, compression="snappy")
    os.rename(tab + ".tmp", tab)
    print(f"wrote {tab}: {rows} rows, {os.path.getsize(tab) / 1e6:.1f} MB")
if encoder == "1" and not os.path.exists(txt):
    # Words the minilm_tiny_text tokenizer knows (others become [UNK]).
    words = ("the an is are was on in of to and cat dog sat mat quick brown fox jump over "
             "lazy hello world model serve gpu worker sentence embed shamal rust candle "
             "token batch pad text fast slow jumped jumping faster slowly").split()
    lengths = rng.integers(4, 24, sentences)
    picks = rng.integers(0, len(words), int(lengths.sum()))
    out, at = [], 0
    for n in lengths:
        out.append(" ".join(words[i] for i in picks[at:at + n]) + ".")
        at += n
    table = pa.table({"id": pa.array(np.arange(sentences, dtype=np.int64)), "text": pa.array(out, pa.string())})
    pq.write_table(table, txt + ".tmp", row_group_size=10_000, compression="snappy")
    os.rename(txt + ".tmp", txt)
    print(f"wrote {txt}: {sentences} sentences, {os.path.getsize(txt) / 1e6:.1f} MB")
PY

# Model repositories: demo as shipped (max_batch_size 64, which caps the
# batch role's batch) and demo1024 (the same file, max_batch_size 1024);
# the text encoder as shipped (no config: the worker's default batch) and
# text1024 (max_batch_size 1024).
mkdir -p "$tmp/repo" "$tmp/gpurepo"
cp -r models/repository/demo "$tmp/repo/"
cp -r models/repository/demo "$tmp/repo/demo1024"
sed -e 's/^name: "demo"/name: "demo1024"/' -e 's/^max_batch_size: 64/max_batch_size: 1024/' \
  models/repository/demo/config.pbtxt >"$tmp/repo/demo1024/config.pbtxt"
cp -r models/gpu/repository/minilm_tiny_text "$tmp/gpurepo/"
cp -r models/gpu/repository/minilm_tiny_text "$tmp/gpurepo/text1024"
printf 'name: "text1024"\nbackend: "candle"\nmax_batch_size: 1024\n' >"$tmp/gpurepo/text1024/config.pbtxt"

record() { # case model rows wall_s job_rows_per_s note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"
}

# ------------------------------------------------------------- inproc --
inproc_demo() { # label extra-args...
  local label="$1"
  shift
  local json="$out/inproc_${label}.json"
  "$bin/examples/batch_inproc" --model models/repository/demo/1/model.onnx --input "$tab" \
    --column INPUT0 --key id --rounds "$rounds" --json "$json" "$@" | sed 's/^/  /'
  record "inproc $label" demo "$rows" \
    "$("$python" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["wall_s"], 3))' "$json")" - \
    "$*"
}
inproc_text() { # label threads extra-args...
  local label="$1" threads="$2"
  shift 2
  local json="$out/inproc_text_${label}.json"
  RAYON_NUM_THREADS="$threads" CANDLE_NUM_THREADS="$threads" "$bin/examples/batch_encoder_inproc" \
    --model models/gpu/repository/minilm_tiny_text/1/model.json --input "$txt" --key id \
    --rounds 1 --device cpu --json "$json" "$@" | sed 's/^/  /'
  record "inproc text $label" minilm_tiny_text "$sentences" \
    "$("$python" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["wall_s"], 3))' "$json")" - \
    "threads $threads $*"
}
if has_stage inproc; then
  echo "== in-process baselines"
  inproc_demo b1024 --batch 1024 --intra-threads 1
  inproc_demo b1024_write --batch 1024 --intra-threads 1 --write "$tmp/inproc_out"
  inproc_demo b64_write --batch 64 --intra-threads 1 --write "$tmp/inproc_out"
  inproc_demo b1024_2threads --batch 1024 --intra-threads 2
  # The floor of a job on two workers: two loops at once, each over half
  # the row groups, each writing its own part.
  inproc_demo b1024_write_parallel2 --batch 1024 --intra-threads 1 --parallel 2 \
    --write "$tmp/inproc_out"
  if [ "$encoder" = 1 ]; then
    inproc_text b1024 1 --batch 1024
    inproc_text b1024_write 1 --batch 1024 --write "$tmp/inproc_out"
    inproc_text b32_write 1 --batch 32 --write "$tmp/inproc_out"
    inproc_text b1024_2threads 2 --batch 1024
  fi
fi

# ------------------------------------------------------------ helpers --
jobs_run=0
# submit ENDPOINT MODEL INPUT CASE NOTE: one job, --wait; records rows/s
# from submit to manifest (this script's clock) and the job's own
# total_rows / (finished - created), from the coordinator's timestamps.
submit() {
  local endpoint="$1" model="$2" input="$3" case="$4" note="$5" shard_rows="$rows_per_shard"
  if [ "$input" = "$txt" ]; then shard_rows="$text_rows_per_shard"; fi
  jobs_run=$((jobs_run + 1))
  local dir="$tmp/out/job$jobs_run" json="$out/job_${case// /_}_$model.json"
  local start end
  start="$(date +%s.%N)"
  if ! "$bin/shamal" --output json batch --batch-endpoint "$endpoint" submit --model "$model" \
    --input "$input" --out "$dir" --key id --rows-per-shard "$shard_rows" --wait \
    >"$json" 2>"$out/job_stderr.log"; then
    echo "batch-bench: job of $model ($case) failed:" >&2
    cat "$out/job_stderr.log" "$json" >&2
    return 1
  fi
  end="$(date +%s.%N)"
  "$python" - "$json" "$start" "$end" "$case" "$model" "$note" "$results" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
job = job.get("job", job)
def field(*names):
    for name in names:
        if name in job:
            return job[name]
    return 0
rows = int(field("total_rows", "totalRows"))
created, finished = int(field("created_at_ms", "createdAtMs")), int(field("finished_at_ms", "finishedAtMs"))
wall = float(sys.argv[3]) - float(sys.argv[2])
job_rate = rows / ((finished - created) / 1000) if finished > created else 0
shards = field("shards_total", "shardsTotal")
print(f"  {sys.argv[4]:<18} {sys.argv[5]:<16} {rows} rows in {wall:.2f} s = {rows / wall:,.0f} rows/s "
      f"(job: {job_rate:,.0f} rows/s created to finished, {shards} shards, state {field('state')})")
with open(sys.argv[7], "a") as f:
    f.write(f"{sys.argv[4]}\t{sys.argv[5]}\t{rows}\t{wall:.3f}\t{job_rate:.0f}\t{sys.argv[6]}\n")
PY
}

wait_ready() { # grpc-port model...
  local port="$1"
  shift
  for _ in $(seq 1 240); do
    if "$python" - "$port" "$@" <<'EOF' 2>/dev/null; then return 0; fi
import sys, tritonclient.grpc as g
c = g.InferenceServerClient(f"127.0.0.1:{sys.argv[1]}")
sys.exit(0 if all(c.is_model_ready(m) for m in sys.argv[2:]) else 1)
EOF
    sleep 0.5
  done
  echo "batch-bench: models $* not ready on port $port" >&2
  return 1
}

# -------------------------------------------------------------- stack --
up_needed=0
for stage in up procs floor online; do has_stage "$stage" && up_needed=1; done
if [ "$up_needed" = 1 ]; then
  read -r http grpc metrics reg_http reg_grpc audit_grpc batch_grpc batch_http < <(free_ports 8)
  "$bin/shamal" up --model-repository "$tmp/repo" --gpu-model-repository "$tmp/gpurepo" \
    --http-port "$http" --grpc-port "$grpc" --metrics-port "$metrics" \
    --registry-http-port "$reg_http" --registry-grpc-port "$reg_grpc" \
    --audit-grpc-port "$audit_grpc" --batch-grpc-port "$batch_grpc" --batch-http-port "$batch_http" \
    --data-dir "$tmp/up" ${up_args[@]+"${up_args[@]}"} >"$out/up.log" 2>&1 &
  pids+=("$!")
  up_pid="$!"
  ready_models=(demo demo1024)
  if [ "$encoder" = 1 ]; then ready_models+=(minilm_tiny_text text1024); fi
  wait_ready "$grpc" "${ready_models[@]}"
  echo "== shamal up ready (gRPC $grpc, batch $batch_grpc)"
fi

# measure ENDPOINT MODEL INPUT CASE NOTE: a first job that loads the
# workers' batch instances (recorded as "... first job"), then JOBS
# measured jobs (the table's median line is what to read).
measure() {
  local endpoint="$1" model="$2" input="$3" case="$4" note="$5" i
  submit "$endpoint" "$model" "$input" "$case first job" "$note; loads the batch instances"
  for i in $(seq 1 "$jobs_per_case"); do
    submit "$endpoint" "$model" "$input" "$case" "$note"
  done
}

if has_stage up; then
  echo "== shamal up: embedded coordinator, 1 worker (batch role of the embedded worker)"
  measure "http://127.0.0.1:$batch_grpc" demo "$tab" "up 1 worker" "max_batch_size 64"
  measure "http://127.0.0.1:$batch_grpc" demo1024 "$tab" "up 1 worker" "max_batch_size 1024"
  if [ "$encoder" = 1 ]; then
    measure "http://127.0.0.1:$batch_grpc" minilm_tiny_text "$txt" "up 1 worker" "default max_batch_size"
    measure "http://127.0.0.1:$batch_grpc" text1024 "$txt" "up 1 worker" "max_batch_size 1024"
  fi
fi

# ------------------------------------------------------------- procs --
if has_stage procs; then
  echo "== production layout: shamal-batch + Redis + worker processes"
  redis="$(scripts/ensure-redis.sh | tail -n 1)"
  prefix="shamal:batchbench:$$"
  # The worker processes serve the models from repositories of their own
  # (no registry), under names the registry is told too: the coordinator
  # asks the registry for the model (GetModel) and the router for its
  # inputs, and `shamal up`'s workers load the pushed version for that.
  mkdir -p "$tmp/wrepo" "$tmp/wgpurepo"
  cp -r models/repository/demo "$tmp/wrepo/bdemo"
  sed -e 's/^name: "demo"/name: "bdemo"/' models/repository/demo/config.pbtxt \
    >"$tmp/wrepo/bdemo/config.pbtxt"
  cp -r "$tmp/repo/demo1024" "$tmp/wrepo/bdemo1024"
  sed -i 's/^name: "demo1024"/name: "bdemo1024"/' "$tmp/wrepo/bdemo1024/config.pbtxt"
  export SHAMAL_REGISTRY_URL="http://127.0.0.1:$reg_http"
  "$bin/shamal" model push "$tmp/wrepo/bdemo/1/model.onnx" --name bdemo --wait >/dev/null
  "$bin/shamal" model push "$tmp/wrepo/bdemo1024/1/model.onnx" --name bdemo1024 --wait >/dev/null
  if [ "$encoder" = 1 ]; then
    cp -r models/gpu/repository/minilm_tiny_text "$tmp/wgpurepo/btext"
    cp -r "$tmp/gpurepo/text1024" "$tmp/wgpurepo/btext1024"
    sed -i 's/^name: "text1024"/name: "btext1024"/' "$tmp/wgpurepo/btext1024/config.pbtxt"
    "$bin/shamal" model push "$tmp/wgpurepo/btext/1/model.safetensors" --name btext --wait >/dev/null
    "$bin/shamal" model push "$tmp/wgpurepo/btext1024/1/model.safetensors" --name btext1024 \
      --wait >/dev/null
  fi
  read -r c_grpc c_http c_metrics < <(free_ports 3)
  SHAMAL_BATCH_INSECURE=true "$bin/shamal-batch" --insecure \
    --grpc-listen "127.0.0.1:$c_grpc" --http-listen "127.0.0.1:$c_http" \
    --metrics-listen "127.0.0.1:$c_metrics" --database-url "sqlite://$tmp/batch.db?mode=rwc" \
    --registry-endpoint "127.0.0.1:$reg_grpc" --inference-endpoint "127.0.0.1:$grpc" \
    --queue-url "$redis" --queue-key-prefix "$prefix" >"$out/coordinator.log" 2>&1 &
  pids+=("$!")
  coordinator="http://127.0.0.1:$c_grpc"

  worker_pids=()
  start_worker() { # kind repository [concurrency]
    local kind="$1" repository="$2" concurrency="${3:-1}" port mport
    read -r port mport < <(free_ports 2)
    local file="$tmp/worker-$port.toml"
    printf 'grpc_listen = "127.0.0.1:%s"\nmetrics_listen = "127.0.0.1:%s"\nmodel_repository = "%s"\ninstances = 1\n[batch]\nqueue = "%s"\nkey_prefix = "%s"\nconcurrency = %s\n' \
      "$port" "$mport" "$repository" "$redis" "$prefix" "$concurrency" >"$file"
    local upper="${kind^^}"
    env "SHAMAL_${upper//-/_}_INSECURE=true" "$bin/shamal-$kind" --config "$file" \
      >"$out/worker-$kind-$port.log" 2>&1 &
    pids+=("$!")
    worker_pids+=("$!")
    wait_ready "$port" "$(ls "$repository")"
  }
  stop_workers() {
    for pid in "${worker_pids[@]}"; do
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    done
    worker_pids=()
  }
  # One model per worker repository at a time, so that an idle model's
  # consumer does not poll beside the measured one.
  run_procs() { # kind model input note
    local kind="$1" model="$2" input="$3" note="$4" n
    mkdir -p "$tmp/only-$model"
    rm -rf "${tmp:?}/only-$model/$model"
    if [ "$kind" = cpu-worker ]; then
      cp -r "$tmp/wrepo/$model" "$tmp/only-$model/"
    else
      cp -r "$tmp/wgpurepo/$model" "$tmp/only-$model/"
    fi
    for n in 1 2; do
      start_worker "$kind" "$tmp/only-$model"
      if [ "$n" = 2 ]; then start_worker "$kind" "$tmp/only-$model"; fi
      measure "$coordinator" "$model" "$input" "procs $n worker(s)" "$note"
      stop_workers
    done
    # One worker scoring two shards at once (batch.concurrency 2).
    start_worker "$kind" "$tmp/only-$model" 2
    measure "$coordinator" "$model" "$input" "procs 1 worker, conc 2" "$note"
    stop_workers
  }
  run_procs cpu-worker bdemo "$tab" "demo, max_batch_size 64"
  run_procs cpu-worker bdemo1024 "$tab" "demo, max_batch_size 1024"
  if [ "$encoder" = 1 ]; then
    run_procs gpu-worker btext "$txt" "minilm_tiny_text, default max_batch_size"
    run_procs gpu-worker btext1024 "$txt" "minilm_tiny_text, max_batch_size 1024"
  fi
fi

# -------------------------------------------------------------- floor --
if has_stage floor; then
  echo "== where a job's time goes (shamal up, 1 worker, demo)"
  small="$data/rows-10000.parquet"
  if [ ! -f "$small" ]; then
    "$python" - "$tab" "$small" <<'PY'
import sys, pyarrow.parquet as pq
pq.write_table(pq.read_table(sys.argv[1]).slice(0, 10_000), sys.argv[2], row_group_size=10_000)
PY
  fi
  shard_seconds() { # the embedded worker's summed shard time of demo, in s
    curl -s "http://127.0.0.1:$metrics/metrics" | awk '/^shamal_worker_batch_shard_duration_seconds_sum/ && /model="demo"/ {s += $2} END {print s + 0}'
  }
  for _ in 1 2 3; do
    submit "http://127.0.0.1:$batch_grpc" demo "$small" "floor 10k rows" "one shard of 10,000 rows: the fixed cost of a job"
  done
  for shard_rows in "$rows" "$rows_per_shard"; do
    before="$(shard_seconds)"
    saved="$rows_per_shard"
    rows_per_shard="$shard_rows"
    submit "http://127.0.0.1:$batch_grpc" demo "$tab" "floor shards $shard_rows" \
      "rows-per-shard $shard_rows"
    rows_per_shard="$saved"
    after="$(shard_seconds)"
    "$python" -c 'import sys; b, a = float(sys.argv[1]), float(sys.argv[2]); print(f"  worker shard time {a - b:.2f} s = {int(sys.argv[3]) / (a - b):,.0f} rows/s while shards ran")' \
      "$before" "$after" "$rows"
    record "floor worker shard time" demo "$rows" \
      "$("$python" -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))' "$before" "$after")" - \
      "sum of shamal_worker_batch_shard_duration_seconds, rows-per-shard $shard_rows"
  done
fi

# ------------------------------------------------------------ online --
if has_stage online; then
  echo "== online demo at $online_rate/s (open loop, $online_duration) through shamal up"
  load() { # json
    "$bin/shamal-loadgen" --url "http://127.0.0.1:$grpc" --model demo --rate "$online_rate" \
      --duration "$online_duration" --warmup 2s --json "$1" >/dev/null
  }
  online_line() { # json label
    "$python" - "$1" "$2" "$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  {sys.argv[2]:<28} p50 {r['p50_us']:>6} us  p99 {r['p99_us']:>6} us  "
      f"{r['ips']:>7.0f} inf/s  errors {r.get('error_total', 0)}")
with open(sys.argv[3], "a") as f:
    f.write(f"online {sys.argv[2]}\tdemo\t-\t-\t-\tp50 {r['p50_us']} us, p99 {r['p99_us']} us, "
            f"{r['ips']:.0f} inf/s, errors {r.get('error_total', 0)}\n")
PY
  }
  load "$out/online_idle.json"
  online_line "$out/online_idle.json" "no batch job"
  # Batch jobs of demo back to back on the same shamal up for as long as
  # the load runs (first one given 2 s to start).
  touch "$tmp/jobs_on"
  (
    while [ -f "$tmp/jobs_on" ]; do
      submit "http://127.0.0.1:$batch_grpc" demo "$tab" "during online" "beside online load" \
        >>"$out/online_jobs.log" || break
    done
  ) &
  jobs_loop="$!"
  sleep 2
  load "$out/online_batch.json"
  rm -f "$tmp/jobs_on"
  online_line "$out/online_batch.json" "batch job of demo running"
  wait "$jobs_loop" || true
  sed 's/^/  /' "$out/online_jobs.log"
  load "$out/online_after.json"
  online_line "$out/online_after.json" "no batch job (after)"
fi

# ------------------------------------------------------------- table --
echo
echo "== results (bench-results/batch/results.tsv; ratio = rows/s / in-process batch 1024 one thread)"
"$python" - "$results" <<'PY'
import sys
lines = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
base = {}
for case, model, rows, wall, job, note in lines:
    if case in ("inproc b1024", "inproc text b1024") and wall != "-":
        base["text" if "text" in case else "demo"] = int(rows) / float(wall)
print(f"{'case':<26} {'model':<18} {'rows':>9} {'wall s':>8} {'rows/s':>10} {'job rows/s':>10} {'ratio':>6}  note")
def line(case, model, rows, wall, job, note):
    rate = int(rows) / float(wall)
    kind = "text" if "text" in model else "demo"
    ratio = f"{rate / base[kind]:.2f}" if kind in base else "-"
    print(f"{case:<26} {model:<18} {rows:>9} {float(wall):>8.2f} {rate:>10,.0f} {job:>10} {ratio:>6}  {note}")
runs = {}
for case, model, rows, wall, job, note in lines:
    if wall == "-":
        print(f"{case:<26} {model:<18} {'':>9} {'':>8} {'':>10} {'':>10} {'':>6}  {note}")
        continue
    if not case.startswith("during"):
        line(case, model, rows, wall, job, note)
    if not case.startswith(("inproc", "floor")) and not case.endswith("first job"):
        runs.setdefault((case, model, rows, note), []).append(float(wall))
print()
print("medians of the measured jobs (after each case's first job):")
for (case, model, rows, note), walls in runs.items():
    walls.sort()
    line(case, model, rows, walls[len(walls) // 2], "-", f"{note} (median of {len(walls)})")
PY
