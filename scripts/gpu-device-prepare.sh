#!/usr/bin/env bash
# Builds, here (Rust toolchain, no GPU), what scripts/gpu-device-check.sh
# runs on a GPU host (CUDA driver and libraries, no Rust), into BUNDLE
# (default gpu-bundle/, git-ignored: carry it with the repository):
#
#   cuda_tests.xz     the gpu-worker's GPU parity tests (services/gpu-worker/tests/cuda.rs)
#   encoder_bench.xz  the in-process encoder benchmark (services/gpu-worker/examples/encoder_bench.rs)
#   BUILD.txt         commit, toolchains, compute capability, the libraries the
#                     binaries load at start-up, sizes
#
#   scripts/gpu-device-prepare.sh [BUNDLE]
#
# Built with `--features cuda` by scripts/cuda-toolchain.sh's CUDA 13.0
# (installed on first use, about 1.2 GB), without debug info and
# xz-compressed: each binary holds candle's kernels as PTX and as sm_90a
# code (about 40 MB), and the working tree and what is carried with it must
# stay within 64 MiB. The first build of a profile runs nvcc over every
# candle kernel: about 20 minutes on two cores.
#
# Environment: CUDA_COMPUTE_CAP (90: H100, H200); CARGO_TARGET_DIR
# (target/cuda: apart from the CPU build, whose candle-core has no CUDA
# backend, so neither rebuilds the other); PROFILE (release; `dev` reuses
# the kernels of a `cargo test --features cuda` build of that target
# directory but times unoptimised host code).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bundle="${1:-gpu-bundle}"

eval "$(scripts/cuda-toolchain.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
profile="${PROFILE:-release}"
export CARGO_PROFILE_RELEASE_DEBUG=0

# The executable cargo built for target $1 (from --message-format=json).
executable() {
  python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if (message.get("reason") == "compiler-artifact" and message["target"]["name"] == sys.argv[1]
            and message.get("executable")):
        print(message["executable"])
' "$1"
}

echo "== building the CUDA parity tests ($profile, --features cuda, sm_$CUDA_COMPUTE_CAP)"
tests="$(cargo test --profile "$profile" -p shamal-gpu-worker --features cuda --test cuda \
  --no-run --message-format=json | executable cuda)"
echo "== building the encoder benchmark ($profile, --features cuda)"
bench="$(cargo build --profile "$profile" -p shamal-gpu-worker --features cuda \
  --example encoder_bench --message-format=json | executable encoder_bench)"
if [ -z "$tests" ] || [ -z "$bench" ]; then
  echo "gpu-device-prepare: cargo named no executable for tests/cuda.rs or encoder_bench" >&2
  exit 1
fi

mkdir -p "$bundle"
rm -f "$bundle/cuda_tests.xz" "$bundle/encoder_bench.xz"
{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), profile $profile"
  rustc --version
  nvcc --version | tail -n 2
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
} >"$bundle/BUILD.txt"
for pair in "cuda_tests:$tests" "encoder_bench:$bench"; do
  name="${pair%%:*}"
  strip --strip-debug -o "$bundle/$name" "${pair#*:}"
  echo "$name: $(du -h "$bundle/$name" | cut -f1), loads $(readelf -d "$bundle/$name" |
    sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')" >>"$bundle/BUILD.txt"
  xz -T0 -6 "$bundle/$name"
done
cat "$bundle/BUILD.txt"
size_kib="$(du -sk "$bundle" | cut -f1)"
echo "bundle: $bundle, $((size_kib / 1024)) MiB"
if [ "$size_kib" -gt $((48 * 1024)) ]; then
  echo "gpu-device-prepare: the bundle leaves under 16 MiB of the 64 MiB carried with the working tree" >&2
fi
