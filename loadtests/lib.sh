# Helpers shared by the benchmark scripts; source it after
# scripts/setup-deps.sh (it uses the project's Python in .deps/venv).

shamal_lib_python="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.deps/venv/bin/python"

# Prints N free TCP ports of 127.0.0.1, separated by spaces.
free_ports() {
  "$shamal_lib_python" - "$1" <<'PY'
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
