#!/usr/bin/env bash
# The release manager's workflow against a running `shamal up`, with the
# `shamal` CLI: push a new version, canary it at 10%, watch traffic reach
# it, promote it, and check that all traffic then goes to it.
#   SHAMAL_REGISTRY_URL  registry REST API of the running stack
#   SHAMAL_HTTP          router's KServe v2 HTTP address (host:port)
set -euo pipefail
shamal=${SHAMAL_BIN:-target/debug/shamal}
model=classifier
fail() { echo "rollout_workflow: $*" >&2; exit 1; }

infer_versions() { # n -> one answering version per line
  local payload='{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}]}'
  for _ in $(seq 1 "$1"); do
    curl -sf -X POST "http://$SHAMAL_HTTP/v2/models/$model/infer" \
      -H 'content-type: application/json' -d "$payload" |
      .deps/venv/bin/python -c 'import sys, json; print(json.load(sys.stdin)["model_version"])'
  done
}

$shamal model push models/repository/demo_int8/1/model.onnx --name "$model" \
  --metadata quantised=int8 --wait --output json > /tmp/push.$$ || fail "push failed"
version=$(.deps/venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' /tmp/push.$$)
rm -f /tmp/push.$$
echo "pushed $model version $version"

# Before any rollout, the new version takes no traffic.
[ -z "$(infer_versions 20 | grep -vx 1 || true)" ] || fail "version $version took traffic before its rollout"

$shamal rollout start "$model" --version "$version" --weight 50 --max-error-rate 0.05
seen=$(infer_versions 200 | sort | uniq -c)
echo "$seen"
echo "$seen" | grep -Eq "^ *[0-9]+ $version$" || fail "canary at 50% got no traffic in 200 requests"
echo "$seen" | grep -Eq "^ *[0-9]+ 1$" || fail "stable version got no traffic in 200 requests"

# A stale revision is refused with exit code 3.
set +e
$shamal rollout shift "$model" --weight 20 --revision 99
code=$?
set -e
[ "$code" = 3 ] || fail "stale revision: expected exit code 3, got $code"

$shamal rollout promote "$model"
$shamal rollout status "$model"
for _ in $(seq 1 50); do
  if [ -z "$(infer_versions 10 | grep -vx "$version" || true)" ]; then
    $shamal rollout history "$model"
    echo "rollout_workflow: passed"
    exit 0
  fi
  sleep 0.1
done
fail "after promote, traffic did not all go to version $version"
