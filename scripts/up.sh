#!/usr/bin/env bash
# Starts Shamal in one process on loopback, serving the bundled demo models
# (or the repository given with --model-repository). Installs the ONNX Runtime
# library into .deps/ and builds the release binary first.
#
#   scripts/up.sh [shamal up flags...]     e.g. --http-port 9000
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-deps.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
if ! command -v cargo >/dev/null 2>&1; then
  echo "up.sh: cargo is required (Rust toolchain 1.92 or newer)" >&2
  exit 1
fi
cargo build --release --locked -p shamal-cli
exec target/release/shamal up "$@"
