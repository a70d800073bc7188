#!/usr/bin/env bash
# Idempotent Prefect set-up for OfflineTourGuide against the server in PREFECT_API_URL:
#   - a `cpu` process work pool (transports, QA, report, the pipeline's orchestration),
#   - a `gpu` process work pool (capture, fold): start one worker per GPU with --limit 1,
#   - a `gpu` global concurrency limit (one slot per GPU, default 1) for GPU-heavy code paths.
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api bash deployments/setup_pools.sh [N_GPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
N_GPUS="${1:-1}"
if [ -z "${PREFECT_API_URL:-}" ]; then
  echo "setup_pools: PREFECT_API_URL is not set; start 'prefect server start --host 127.0.0.1' and export it first" >&2
  exit 2
fi
for pool in cpu gpu; do
  if "$PREFECT" --no-prompt work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool '$pool' exists"
  else
    "$PREFECT" --no-prompt work-pool create "$pool" --type process >/dev/null
    echo "work pool '$pool' created"
  fi
done
if "$PREFECT" --no-prompt global-concurrency-limit inspect gpu >/dev/null 2>&1; then
  "$PREFECT" --no-prompt global-concurrency-limit update gpu --limit "$N_GPUS" >/dev/null
  echo "global concurrency limit 'gpu' set to $N_GPUS"
else
  "$PREFECT" --no-prompt global-concurrency-limit create gpu --limit "$N_GPUS" >/dev/null
  echo "global concurrency limit 'gpu' created with $N_GPUS slot(s)"
fi
