#!/usr/bin/env bash
# Property-based test of the registry's REST API against its own OpenAPI
# document: starts a registry (in-memory SQLite) on free loopback ports,
# seeds a few models, versions and aliases, and runs schemathesis with the
# `not_a_server_error` check (no 5xx for any generated request, valid or
# not).
#
#   scripts/schemathesis.sh                  # 50 examples per operation
#   SCHEMATHESIS_EXAMPLES=500 scripts/schemathesis.sh
#   scripts/schemathesis.sh --checks all     # extra flags go to schemathesis
#
# Needs schemathesis in the project venv:
#   .deps/venv/bin/pip install schemathesis
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
schemathesis="${SCHEMATHESIS:-$root/.deps/venv/bin/schemathesis}"
if [[ ! -x "$schemathesis" ]]; then
    echo "schemathesis not found at $schemathesis; install it with: .deps/venv/bin/pip install schemathesis" >&2
    exit 2
fi
python="${PYTHON:-$root/.deps/venv/bin/python}"
[[ -x "$python" ]] || python=python3

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
http_port="$(free_port)"
grpc_port="$(free_port)"
metrics_port="$(free_port)"
artifacts="$(mktemp -d)"
log="$(mktemp)"
# schemathesis keeps a cache in its working directory: not in the repo.
workdir="$(mktemp -d)"
base="http://127.0.0.1:$http_port"

cargo build -q -p shamal-registry
"$root/target/debug/shamal-registry" --insecure \
    --database-url sqlite::memory: \
    --artifact-dir "$artifacts" \
    --http-listen "127.0.0.1:$http_port" \
    --grpc-listen "127.0.0.1:$grpc_port" \
    --metrics-listen "127.0.0.1:$metrics_port" \
    --max-artifact-bytes 1048576 \
    >"$log" 2>&1 &
registry_pid=$!
cleanup() {
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    rm -rf "$artifacts" "$log" "$workdir"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
    if "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "$base/openapi.json" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$registry_pid" 2>/dev/null; then
        echo "the registry exited:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.2
done

# Seed data so that generated requests also reach existing resources.
"$python" - "$base" <<'EOF'
import hashlib, json, sys, urllib.request

base = sys.argv[1]

def call(method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("content-type", "application/octet-stream" if raw is not None else "application/json")
    request.add_header("x-shamal-actor", "schemathesis-seed")
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read() or b"null")

for model in ("fraud", "churn"):
    for n in (1, 2):
        payload = f"{model} v{n}".encode()
        digest = hashlib.sha256(payload).hexdigest()
        call("PUT", f"/v1/artifacts/{digest}", raw=payload)
        call("POST", f"/v1/models/{model}/versions", {"sha256": digest, "format": "onnx"})
    call("PUT", f"/v1/models/{model}/aliases/production", {"version": 1})
call("POST", "/v1/models", {"name": "empty", "description": "no versions"})
print("seeded 2 models with 2 versions each and a production alias")
EOF

set +e
(cd "$workdir" && "$schemathesis" run "$base/openapi.json" \
    --checks not_a_server_error \
    --max-examples "${SCHEMATHESIS_EXAMPLES:-50}" \
    --generation-database none \
    --request-timeout 10 \
    "$@")
status=$?
set -e
if grep -q "panicked" "$log"; then
    echo "the registry panicked during the run:" >&2
    grep -A5 "panicked" "$log" >&2
    status=1
fi
exit "$status"
