#!/usr/bin/env bash
# The gpu-worker's GPU check: the one script to run on a GPU host (CUDA
# driver, PyTorch's python3 with numpy and the CUDA 13 libraries, no Rust),
# from the repository root, with the binaries scripts/gpu-device-prepare.sh
# built elsewhere:
#
#   scripts/gpu-device-check.sh [BUNDLE]        (default: gpu-bundle)
#
# 1. host: GPU, driver, the CUDA libraries the binaries load (found in
#    python3's nvidia-* wheels and the usual CUDA directories);
# 2. the parity tests (tests/cuda.rs) on CUDA device 0, with
#    SHAMAL_REQUIRE_CUDA=1 so that a missing GPU fails them: FP32 within
#    the numpy references' tolerance, FP16 and BF16, GPU against CPU,
#    the worker over gRPC reporting its GPU;
# 3. in-process throughput of a random-weight encoder of all-MiniLM-L6-v2's
#    dimensions (models/generate_gpu.py --minilm-random; the real weights
#    are 90 MB and the host has no network) at batch 1, 8, 32 and 128, in
#    float32, float16 and bfloat16, sentences/s.
#
# Results go to $OUT (bench-results/gpu-device when OUT is unset): host.txt,
# tests.log, bench.log, bench_<dtype>.json, summary.txt. Knobs: DTYPES
# ("float32 float16 bfloat16"), BATCHES (1,8,32,128), SEQ_LEN (32, as the
# CPU figures in docs/benchmarks.md), BENCH_DURATION (3s per batch size),
# BENCH_WARMUP (1s). About two minutes on an H200; exits non-zero when a
# test fails or a benchmark cannot run.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bundle="$(cd "${1:-gpu-bundle}" && pwd)"
out="${OUT:-$repo/bench-results/gpu-device}"
mkdir -p "$out"
dtypes="${DTYPES:-float32 float16 bfloat16}"
batches="${BATCHES:-1,8,32,128}"
seq_len="${SEQ_LEN:-32}"
duration="${BENCH_DURATION:-3s}"
warmup="${BENCH_WARMUP:-1s}"
python="${PYTHON:-python3}"
status=0

# The binaries, unpacked (the bundle carries them xz-compressed).
work="$(mktemp -d "${TMPDIR:-/tmp}/shamal-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
for binary in cuda_tests encoder_bench; do
  if [ ! -f "$bundle/$binary.xz" ]; then
    echo "gpu-device-check: $bundle/$binary.xz is missing; build it with scripts/gpu-device-prepare.sh" >&2
    exit 2
  fi
  "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bundle/$binary.xz" "$work/$binary"
  chmod +x "$work/$binary"
done

# The CUDA libraries candle links (libcublas, libcublasLt, libcurand,
# libnvrtc, libcudart): PyTorch's nvidia-* wheels, else a CUDA install;
# libcuda comes with the driver.
library_dirs="$("$python" - <<'EOF'
import pathlib
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = {str(lib) for base in nvidia.__path__ for lib in pathlib.Path(base).glob("*/lib") if lib.is_dir()}
print(":".join(sorted(dirs)))
EOF
)"
for dir in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 ${LD_LIBRARY_PATH//:/ }; do
  [ -d "$dir" ] && library_dirs="$library_dirs:$dir"
done
export LD_LIBRARY_PATH="${library_dirs#:}"

{
  echo "== date"; date -u
  echo "== bundle"; cat "$bundle/BUILD.txt" 2>/dev/null
  echo "== nvidia-smi"; nvidia-smi 2>&1
  echo "== LD_LIBRARY_PATH"; echo "$LD_LIBRARY_PATH" | tr ':' '\n'
  for binary in cuda_tests encoder_bench; do
    echo "== ldd $binary"; ldd "$work/$binary" 2>&1
  done
} >"$out/host.txt"
head -n 40 "$out/host.txt" | grep -E "Driver Version|H200|H100|CUDA Version" || true
if grep -q "=> not found" "$out/host.txt"; then
  echo "gpu-device-check: libraries the binaries need are missing:" >&2
  grep "=> not found" "$out/host.txt" | sort -u >&2
  exit 2
fi

echo "== parity tests on the GPU"
SHAMAL_REQUIRE_CUDA=1 SHAMAL_WORKSPACE_ROOT="$repo" RUST_BACKTRACE=1 \
  timeout 600 "$work/cuda_tests" --test-threads 1 2>&1 | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}
[ "$tests_status" -eq 0 ] || status=1

echo "== in-process encoder throughput on the GPU"
{
  "$python" models/generate_gpu.py --minilm-random "$work/float32" || exit 1
  for dtype in $dtypes; do
    if [ "$dtype" != float32 ]; then
      mkdir -p "$work/$dtype"
      ln -sf "$work/float32/model.safetensors" "$work/$dtype/model.safetensors"
      "$python" - "$work/float32/model.json" "$work/$dtype/model.json" "$dtype" <<'EOF'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["dtype"] = sys.argv[3]
json.dump(spec, open(sys.argv[2], "w"), indent=2)
EOF
    fi
    echo "-- $dtype"
    timeout 300 "$work/encoder_bench" --model "$work/$dtype/model.json" --device cuda \
      --batch "$batches" --seq-len "$seq_len" --duration "$duration" --warmup "$warmup" \
      --json "$out/bench_$dtype.json" || exit 1
  done
} 2>&1 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

"$python" - "$out" "$dtypes" "$tests_status" <<'EOF' | tee "$out/summary.txt"
import json, pathlib, sys
out, dtypes, tests_status = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3]
print(f"parity tests: {'passed' if tests_status == '0' else 'FAILED (exit ' + tests_status + ')'}")
rows = {}
for dtype in dtypes:
    path = out / f"bench_{dtype}.json"
    if path.exists():
        document = json.loads(path.read_text())
        rows[dtype] = {r["batch"]: (r["sentences_per_s"], r["p50_us"]) for r in document["results"]}
batches = sorted({b for row in rows.values() for b in row})
if rows:
    print(f"in-process sentences/s (p50 ms per call), random all-MiniLM-L6-v2 weights, on {document['device']}:")
    print("dtype".ljust(10) + "".join(f"batch {b}".rjust(20) for b in batches))
    for dtype, row in rows.items():
        cells = "".join(
            (f"{row[b][0]:.0f} ({row[b][1] / 1000:.2f})" if b in row else "-").rjust(20) for b in batches)
        print(dtype.ljust(10) + cells)
EOF
exit "$status"
