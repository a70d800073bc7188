#!/usr/bin/env bash
# The project's test command (README; .ci/run calls exactly this):
#   1. set up / refresh .venv from requirements.lock (deployments/bootstrap.sh),
#   2. run the whole pytest suite offline (slow tests included),
#   3. when tests/vllm/run_parity.sh exists and TOURGUIDE_VLLM_TESTS is not 0: build (or reuse)
#      the separate vLLM CPU venv and run the vLLM-vs-torch parity tests there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deployments/bootstrap.sh
# The UI check (tests/e2e/test_ui.py) drives Debian's chromium with playwright-core from npm (no
# browser download); without node, npm or chromium it skips and says why. As root on a Debian/
# Ubuntu CI box, chromium is installed from the distribution's packages first (~30 s; best effort).
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "tests/run.sh: could not install chromium; the UI check will skip" >&2
fi
if command -v npm >/dev/null && [ -x "${CHROMIUM:-/usr/bin/chromium}" ] && [ ! -d tests/e2e/node_modules/playwright-core ]; then
  npm ci --prefix tests/e2e --no-audit --no-fund --silent || echo "tests/run.sh: npm ci failed; the UI check will skip" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/python -m pytest -q "$@"
if [ "${TOURGUIDE_VLLM_TESTS:-1}" != "0" ] && [ -f tests/vllm/run_parity.sh ] && [ $# -eq 0 ]; then
  bash tests/vllm/run_parity.sh
fi
