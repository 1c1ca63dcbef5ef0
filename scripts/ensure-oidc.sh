#!/usr/bin/env bash
# Makes the development OpenID provider (infra/oidc-dev, node-oidc-provider)
# answer for the test suite and prints its issuer URL (last line of stdout).
# Order of preference:
#   1. SHAMAL_TEST_OIDC_ISSUER, if set and its discovery document answers
#      (naming that issuer);
#   2. the project-local provider on http://127.0.0.1:$SHAMAL_OIDC_PORT
#      (default: the first of 9411..9420 that is free or already serves
#      this checkout's provider), if already answering;
#   3. that provider, started here in the background: `npm ci` of the
#      committed infra/oidc-dev/package-lock.json into .deps/oidc/app (the
#      npm registry only), signing keys generated once into
#      .deps/oidc/jwks.json (private keys: the tests forge tokens with
#      them), pid and log in .deps/oidc/.
# Needs Node.js 20 or newer and npm.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

data="$root/.deps/oidc"
app="$data/app"
jwks="$data/jwks.json"
# An explicit SHAMAL_OIDC_PORT is used as given; by default the first of
# 9411..9420 that is free or already serves this checkout's provider (one of
# another checkout, signing with other keys, is passed over).
if [ -n "${SHAMAL_OIDC_PORT:-}" ]; then
  ports=("$SHAMAL_OIDC_PORT")
else
  ports=(9411 9412 9413 9414 9415 9416 9417 9418 9419 9420)
fi
# Sets port, issuer, pid_file and log for port $1 (oidc.pid and oidc.log
# for 9411, oidc-<port>.* for others).
use_port() {
  port="$1"
  issuer="http://127.0.0.1:$port"
  local name="oidc"
  if [ "$port" != 9411 ]; then name="oidc-$port"; fi
  pid_file="$data/$name.pid"
  log="$data/$name.log"
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "ensure-oidc: node and npm are required (Node.js 20 or newer)" >&2
  exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "ensure-oidc: Node.js $(node --version) is too old: oidc-provider 9 needs 20 or newer" >&2
  exit 1
fi

# Whether the discovery document of issuer $1 answers and names $1.
answers() {
  node -e '
    const issuer = process.argv[1];
    fetch(new URL(".well-known/openid-configuration", issuer.endsWith("/") ? issuer : issuer + "/"),
          { signal: AbortSignal.timeout(2000) })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error(String(r.status)))))
      .then((d) => process.exit(d.issuer === issuer ? 0 : 1))
      .catch(() => process.exit(1));' "$1" 2>/dev/null
}

if [ -n "${SHAMAL_TEST_OIDC_ISSUER:-}" ]; then
  if answers "$SHAMAL_TEST_OIDC_ISSUER"; then
    echo "$SHAMAL_TEST_OIDC_ISSUER"
    exit 0
  fi
  echo "ensure-oidc: SHAMAL_TEST_OIDC_ISSUER=$SHAMAL_TEST_OIDC_ISSUER does not answer; using the local provider" >&2
fi

# Whether the provider at $1 signs with the keys in $jwks (the tests forge
# tokens with them).
same_keys() {
  node -e '
    const fs = require("node:fs");
    const [issuer, path] = process.argv.slice(1);
    const mine = JSON.parse(fs.readFileSync(path, "utf8")).keys.map((k) => k.kid).sort().join(" ");
    fetch(`${issuer}/jwks`, { signal: AbortSignal.timeout(2000) })
      .then((r) => r.json())
      .then((d) => process.exit(d.keys.map((k) => k.kid).sort().join(" ") === mine ? 0 : 1))
      .catch(() => process.exit(1));' "$1" "$jwks" 2>/dev/null
}

# Whether something listens on 127.0.0.1:$1.
listening() {
  node -e '
    const socket = require("node:net").connect(Number(process.argv[1]), "127.0.0.1");
    socket.on("connect", () => process.exit(0));
    socket.on("error", () => process.exit(1));' "$1" 2>/dev/null
}

chosen=""
for candidate in "${ports[@]}"; do
  use_port "$candidate"
  if answers "$issuer"; then
    if [ -f "$jwks" ] && same_keys "$issuer"; then
      echo "$issuer"
      exit 0
    fi
    echo "ensure-oidc: the provider at $issuer does not sign with the keys in $jwks" \
      "(another checkout's, or the file was removed); trying another port" >&2
    continue
  fi
  if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "ensure-oidc: a provider (pid $(cat "$pid_file")) runs but does not answer at $issuer; see $log" >&2
    exit 1
  fi
  if ! listening "$candidate"; then
    chosen="$candidate"
    break
  fi
done
if [ -z "$chosen" ]; then
  echo "ensure-oidc: no port for the provider among ${ports[*]}" >&2
  exit 1
fi
use_port "$chosen"

# Install (again only when the committed lock changed).
mkdir -p "$app"
lock_sum="$(cat infra/oidc-dev/package.json infra/oidc-dev/package-lock.json | sha256sum | cut -d' ' -f1)"
if [ ! -d "$app/node_modules/oidc-provider" ] || [ "$(cat "$app/.installed" 2>/dev/null)" != "$lock_sum" ]; then
  echo "ensure-oidc: installing oidc-provider into $app (npm ci)" >&2
  cp infra/oidc-dev/package.json infra/oidc-dev/package-lock.json "$app/"
  (cd "$app" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2)
  echo "$lock_sum" >"$app/.installed"
fi
# Next to its node_modules, where ES module imports resolve.
cp infra/oidc-dev/provider.mjs "$app/provider.mjs"

SHAMAL_OIDC_PORT="$port" SHAMAL_OIDC_ISSUER="$issuer" SHAMAL_OIDC_JWKS="$jwks" \
  nohup setsid node "$app/provider.mjs" >"$log" 2>&1 </dev/null &
echo $! >"$pid_file"

for _ in $(seq 1 100); do
  if answers "$issuer"; then
    echo "ensure-oidc: provider started (pid $(cat "$pid_file"), keys $jwks, log $log)" >&2
    echo "$issuer"
    exit 0
  fi
  if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "ensure-oidc: the provider exited; its log ($log):" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "ensure-oidc: the provider did not answer at $issuer within 20 s; see $log" >&2
exit 1
