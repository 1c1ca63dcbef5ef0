#!/usr/bin/env bash
# Validates the Kubernetes manifests (infra/k8s/*.yaml, or the files given)
# against the Kubernetes API schemas with kubernetes-validate, strictly
# (unknown fields fail), offline: the schemas ship inside the package.
#
# Custom resources have no schema there and are skipped by name, each one
# reported: cert-manager's Issuer, ClusterIssuer and Certificate
# (05-certificates.yaml; their contents are checked by
# services/router/tests/k8s_manifests.rs) and KEDA's ScaledObject. Any other
# kind without a schema fails, so a misspelt apiVersion does not pass
# unnoticed.
#
# The package is installed once, pinned, into its own virtual environment
# under .deps/ (PyPI only). Needs python3 with the venv module.
#
#   scripts/check-manifests.sh                      every manifest
#   KUBERNETES_VERSIONS="1.33 1.37" scripts/check-manifests.sh infra/k8s/40-router.yaml
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="1.37.0"
venv="$root/.deps/kubernetes-validate"
# The oldest Kubernetes the manifests are meant for, and the newest the
# package knows.
versions="${KUBERNETES_VERSIONS:-1.31 1.37}"

if ! "$venv/bin/python" -c "
import sys
from kubernetes_validate.version import __version__
sys.exit(__version__ != '$version')" 2>/dev/null; then
  echo "check-manifests: installing kubernetes-validate $version into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi

if [ "$#" -eq 0 ]; then
  set -- infra/k8s/*.yaml
fi

KUBERNETES_VERSIONS="$versions" "$venv/bin/python" - "$@" <<'PYTHON'
import os
import sys

import kubernetes_validate.utils as kv

# (API group, kind) of the custom resources the manifests use.
SKIPPED = {
    ("cert-manager.io", "Issuer"),
    ("cert-manager.io", "ClusterIssuer"),
    ("cert-manager.io", "Certificate"),
    ("keda.sh", "ScaledObject"),
}

versions = os.environ["KUBERNETES_VERSIONS"].split()
passed = failed = skipped = 0
for filename in sys.argv[1:]:
    for resource in kv.resources_from_file(filename):
        api_version = resource.get("apiVersion", "")
        kind = resource.get("kind", "")
        name = f"{kind.lower()}/{resource.get('metadata', {}).get('name', '?')}"
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        if (group, kind) in SKIPPED:
            print(f"SKIP {filename} {name}: {api_version} is a custom resource (no schema)")
            skipped += 1
            continue
        for version in versions:
            try:
                kv.validate(resource, version, strict=True)
            except kv.ValidationError as error:
                path = ".".join(str(item) for item in error.path)
                print(f"FAIL {filename} {name} (Kubernetes {version}): {path}: {error.message}")
                failed += 1
            except kv.SchemaNotFoundError:
                print(f"FAIL {filename} {name}: no schema for {api_version} {kind} "
                      f"in Kubernetes {version} (misspelt, or a custom resource to skip)")
                failed += 1
            else:
                passed += 1
print(f"manifests: {passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
PYTHON
