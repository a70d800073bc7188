#!/usr/bin/env bash
# The project's test command (README; .ci/run calls exactly this):
#   1. set up / refresh .venv from requirements.lock (deployments/bootstrap.sh),
#   2. run the whole pytest suite offline (slow tests included),
#   3. when tests/vllm/run_parity.sh exists and TOURGUIDE_VLLM_TESTS is not 0: build (or reuse)
#      the separate vLLM CPU venv and run the vLLM-vs-torch parity tests there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deployments/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/python -m pytest -q "$@"
if [ "${TOURGUIDE_VLLM_TESTS:-1}" != "0" ] && [ -f tests/vllm/run_parity.sh ] && [ $# -eq 0 ]; then
  bash tests/vllm/run_parity.sh
fi
