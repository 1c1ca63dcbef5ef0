#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, checks
# formatting and lints, runs every Rust test, then starts the platform and runs
# Triton's own clients against it (tritonclient gRPC + HTTP, perf_analyzer).
#
#   scripts/test.sh            everything
#   SKIP_COMPAT=1 scripts/test.sh   Rust checks and tests only
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

# The build and test artifacts take about 15 GB of target/. Say so up front
# rather than failing half-way through a link with ENOSPC.
free_kb="$(df -Pk . | awk 'NR==2 {print $4}')"
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((15 * 1024 * 1024)) ]; then
  echo "test.sh: warning: only $((free_kb / 1024 / 1024)) GiB free on $(df -P . | awk 'NR==2 {print $6}');" \
    "the build needs about 15 GiB (delete an old target/ directory)" >&2
fi

# Every test that needs an outside service (Redis, PostgreSQL, S3, the
# redis-server binary, the real all-MiniLM-L6-v2) fails here when it is
# missing, rather than being skipped as in a bare `cargo test`
# (tests/support/services.rs, docs/testing.md). The steps below provide them.
export SHAMAL_REQUIRE_SERVICES=1

step "installing project-local dependencies (.deps/, with the real all-MiniLM-L6-v2)"
SHAMAL_SETUP_MINILM=1 scripts/setup-deps.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
if [ -z "${ORT_DYLIB_PATH:-}" ] || [ ! -f "$ORT_DYLIB_PATH" ]; then
  echo "test.sh: ONNX Runtime library not found after setup" >&2
  exit 1
fi
# env.sh exports it when setup put the weights in .deps/minilm (or keeps the
# caller's); the gpu-worker's real-model test fails if the files are absent.
if [ -z "${SHAMAL_MINILM_DIR:-}" ]; then
  echo "test.sh: all-MiniLM-L6-v2 not found in .deps/minilm/model after setup" >&2
  exit 1
fi
echo "using SHAMAL_MINILM_DIR=$SHAMAL_MINILM_DIR"

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo is required (Rust toolchain 1.92 or newer)" >&2
  exit 1
fi

step "PostgreSQL for the registry's store tests"
SHAMAL_TEST_POSTGRES_URL="$(scripts/ensure-postgres.sh | tail -1)"
export SHAMAL_TEST_POSTGRES_URL
echo "using $SHAMAL_TEST_POSTGRES_URL"

step "Redis for the async queue's tests (and redis-server for its crash test)"
SHAMAL_TEST_REDIS_URL="$(scripts/ensure-redis.sh | tail -1)"
export SHAMAL_TEST_REDIS_URL
echo "using $SHAMAL_TEST_REDIS_URL"

step "an S3-compatible server (moto) for the batch inference tests"
SHAMAL_TEST_S3_ENDPOINT="$(scripts/ensure-s3.sh | tail -1)"
export SHAMAL_TEST_S3_ENDPOINT
echo "using $SHAMAL_TEST_S3_ENDPOINT"

step "the development OpenID provider for the token validation tests"
SHAMAL_TEST_OIDC_ISSUER="$(scripts/ensure-oidc.sh | tail -1)"
export SHAMAL_TEST_OIDC_ISSUER
# Its signing keys, private halves included: the tests forge tokens with them.
export SHAMAL_TEST_OIDC_JWKS="$root/.deps/oidc/jwks.json"
echo "using $SHAMAL_TEST_OIDC_ISSUER (keys $SHAMAL_TEST_OIDC_JWKS)"

step "Chromium for the registry web UI's browser test"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
fi
SHAMAL_TEST_CHROMIUM="$(command -v chromium)"
export SHAMAL_TEST_CHROMIUM
echo "using $SHAMAL_TEST_CHROMIUM"

step "Java 17 for the Spark helper's tests (a local Spark session)"
if ! command -v java >/dev/null 2>&1; then
  # Debian's slim images lack the man directory the package's postinst
  # links into.
  if [ "$(id -u)" = 0 ]; then
    mkdir -p /usr/share/man/man1
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
  else
    sudo mkdir -p /usr/share/man/man1
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
  fi
fi
echo "using $(command -v java) ($(java -version 2>&1 | head -n 1))"

step "Kubernetes manifests against the API schemas (kubernetes-validate)"
scripts/check-manifests.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "docs/registry-api.md matches the OpenAPI document"
.deps/venv/bin/python scripts/gen-api-docs.py --check-markdown

step "registry REST API against its OpenAPI document (schemathesis: no 5xx)"
SCHEMATHESIS_EXAMPLES="${SCHEMATHESIS_EXAMPLES:-25}" scripts/schemathesis.sh

if [ "${SKIP_COMPAT:-0}" = "1" ]; then
  echo "test.sh: SKIP_COMPAT=1, Triton client compatibility tests not run"
  exit 0
fi

step "compatibility: starting shamal up on free ports"
cargo build --locked -p shamal-cli
ready() {
  .deps/venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$http_port/v2/health/ready" >/dev/null 2>&1
}
free_port() {
  .deps/venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
http_port="$(free_port)"
grpc_port="$(free_port)"
metrics_port="$(free_port)"
registry_http_port="$(free_port)"
registry_grpc_port="$(free_port)"
audit_grpc_port="$(free_port)"
batch_grpc_port="$(free_port)"
batch_http_port="$(free_port)"
data_dir="$(mktemp -d)"
log="$(mktemp)"
target/debug/shamal up --model-repository models/repository --data-dir "$data_dir" \
  --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port" \
  --registry-http-port "$registry_http_port" --registry-grpc-port "$registry_grpc_port" \
  --audit-grpc-port "$audit_grpc_port" \
  --batch-grpc-port "$batch_grpc_port" --batch-http-port "$batch_http_port" >"$log" 2>&1 &
stack_pid=$!
cleanup() {
  kill "$stack_pid" 2>/dev/null || true
  wait "$stack_pid" 2>/dev/null || true
}
trap cleanup EXIT

for _ in $(seq 1 300); do
  if ready; then
    break
  fi
  if ! kill -0 "$stack_pid" 2>/dev/null; then
    echo "test.sh: shamal up exited early:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.2
done
if ! ready; then
  echo "test.sh: shamal up did not become ready:" >&2
  cat "$log" >&2
  exit 1
fi

export SHAMAL_GRPC_URL="127.0.0.1:$grpc_port"
export SHAMAL_HTTP_URL="127.0.0.1:$http_port"
export SHAMAL_METRICS_URL="127.0.0.1:$metrics_port"

step "compatibility: tritonclient (gRPC and HTTP)"
.deps/venv/bin/python -m pytest -q tests/compat/test_tritonclient.py

step "compatibility: scoring a DataFrame from Spark (python/shamal_spark, local[2])"
.deps/venv/bin/python -m pytest -q tests/spark

step "compatibility: perf_analyzer"
tests/compat/perf_analyzer.sh

step "release manager workflow: shamal model/rollout CLI"
SHAMAL_REGISTRY_URL="http://127.0.0.1:$registry_http_port" SHAMAL_HTTP="127.0.0.1:$http_port" \
  tests/compat/rollout_workflow.sh

step "graceful stop on SIGINT"
kill -INT "$stack_pid"
for _ in $(seq 1 100); do
  kill -0 "$stack_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$stack_pid" 2>/dev/null; then
  echo "test.sh: shamal up did not stop within 10 s of SIGINT" >&2
  exit 1
fi
wait "$stack_pid" && status=0 || status=$?
if [ "$status" -ne 0 ]; then
  echo "test.sh: shamal up exited with status $status after SIGINT" >&2
  cat "$log" >&2
  exit 1
fi
trap - EXIT
echo "test.sh: all checks passed"
