# Source me: points the cpu-worker at the project-local ONNX Runtime.
_shamal_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_DYLIB_PATH="$(ls "$_shamal_root"/.deps/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)"
export ORT_DYLIB_PATH
unset _shamal_root
