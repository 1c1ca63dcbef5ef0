# Source me: points the cpu-worker at the project-local ONNX Runtime, and the
# gpu-worker's real-model test at the all-MiniLM-L6-v2 weights when
# `SHAMAL_SETUP_MINILM=1 scripts/setup-deps.sh` has put them in .deps/minilm.
_shamal_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_DYLIB_PATH="$(ls "$_shamal_root"/.deps/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)"
export ORT_DYLIB_PATH
if [ -z "${SHAMAL_MINILM_DIR:-}" ] && [ -f "$_shamal_root/.deps/minilm/model/tokenizer.json" ]; then
  export SHAMAL_MINILM_DIR="$_shamal_root/.deps/minilm/model"
fi
unset _shamal_root
