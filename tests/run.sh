#!/usr/bin/env bash
# The project's test command (README; .ci/run calls exactly this):
#   1. set up / refresh .venv from requirements.lock (deployments/bootstrap.sh),
#   2. run the whole pytest suite offline (slow tests included), in three lanes at once,
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
if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest -q "$@"
else
  # The whole suite in three lanes at once. The server tests (a real Prefect server with process
  # workers: tests/e2e, tests/scale, the CLI's server and console tests) spend most of their time
  # waiting on process starts, polls and heartbeats, so they overlap well with the CPU-bound rest:
  # ~26 min in one lane on 2 cores, less than that in three. Each lane has its own Prefect home,
  # PostgreSQL databases and ports; its output is printed when it ends.
  lanes=("tests/e2e tests/flows/test_server_cli.py tests/flows/test_console.py" "tests/scale"
         "--ignore=tests/e2e --ignore=tests/scale --ignore=tests/flows/test_server_cli.py --ignore=tests/flows/test_console.py")
  logs="$(mktemp -d -t tourguide-lanes-XXXXXX)"
  pids=()
  for i in "${!lanes[@]}"; do
    # shellcheck disable=SC2086  # each lane is a word list of pytest arguments
    .venv/bin/python -m pytest -q ${lanes[$i]} >"$logs/lane$i.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed=1
    echo "=== tests/run.sh lane $i: pytest ${lanes[$i]}"
    cat "$logs/lane$i.log"
  done
  rm -rf "$logs"
  [ "$failed" = 0 ] || { echo "tests/run.sh: a test lane failed (see above)" >&2; exit 1; }
fi
if [ "${TOURGUIDE_VLLM_TESTS:-1}" != "0" ] && [ -f tests/vllm/run_parity.sh ] && [ $# -eq 0 ]; then
  bash tests/vllm/run_parity.sh
fi
