# Set-up and helpers shared by the benchmark scripts. Sourcing it installs
# what the project needs (scripts/setup-deps.sh), loads its environment
# (scripts/env.sh: ONNX Runtime's library and friends), and leaves the shell
# in the repository root with `repo` and `python` (the project's venv) set.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=/dev/null
source scripts/setup-deps.sh
# shellcheck source=/dev/null
source scripts/env.sh
cd "$repo"
python="$repo/.deps/venv/bin/python"

# Prints N free TCP ports of 127.0.0.1, separated by spaces.
free_ports() {
  "$python" - "$1" <<'PY'
import socket
import sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}
