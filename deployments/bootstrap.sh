#!/usr/bin/env bash
# Set up (or refresh) the project's venv at .venv from requirements.lock: idempotent and quick
# when nothing changed. Usage: bash deployments/bootstrap.sh   (PYTHON=python3.11 to pick one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
stamp=.venv/.tourguide-installed
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt requirements.lock ] && [ "$stamp" -nt pyproject.toml ] \
   && .venv/bin/python -c "import torch, prefect, transformers, lib, flows" 2>/dev/null; then
  exit 0
fi
echo "bootstrap: installing the pinned environment into .venv (about 1.5 minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
touch "$stamp"
