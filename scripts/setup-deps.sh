#!/usr/bin/env bash
# Installs what Shamal needs outside Cargo into the project-local .deps/:
# a Python venv with ONNX Runtime 1.31.1 (its libonnxruntime.so is what the
# cpu-worker loads), the model generator's packages and Triton's Python client.
# Idempotent and quiet when everything is already there. Prints nothing on
# success; source scripts/env.sh afterwards for ORT_DYLIB_PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
venv="$deps/venv"
stamp="$deps/.python-deps-v3"
mkdir -p "$deps"

if ! command -v python3 >/dev/null 2>&1; then
  echo "setup-deps: python3 is required (apt-get install python3 python3-venv)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian splits venv support out of python3.
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      rm -rf "$venv"
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      echo "setup-deps: python3 -m venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -r "$root/scripts/requirements.txt"
  touch "$stamp"
fi
