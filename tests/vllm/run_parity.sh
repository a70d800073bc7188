#!/usr/bin/env bash
# Run tests/vllm (vLLM-vs-torch capture parity + the backend's unit tests) inside the separate
# vLLM CPU venv, building or reusing it first. Usage: bash tests/vllm/run_parity.sh [pytest args]
# About 2 minutes on 2 cores once the venv exists (3 engine starts of ~20 s each); it prints the
# parity figures at the end. tests/run.sh calls it after the main suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/vllm/setup_venv.sh
# The venv holds no project code: the checkout is imported from here (and by vLLM's workers,
# which inherit the environment and import lib.capture.vllm_worker by its dotted path).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB; vLLM's CPU default would grab far more
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TOURGUIDE_REQUIRE_VLLM=1  # the parity tests must run here, never skip
report="$(mktemp -t tourguide-parity-XXXXXX.json)"
trap 'rm -f "$report"' EXIT
export TOURGUIDE_PARITY_REPORT="$report"
.venv-vllm/bin/python -m pytest tests/vllm -q "$@"
.venv-vllm/bin/python - "$report" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1])) if open(sys.argv[1]).read().strip() else {}
print("vLLM vs torch backend parity (CPU, fp32; max|d| / max|torch|, tolerance 1e-4):")
print(f"{'family':8} {'engine start s':>14} {'activations':>12} {'logits':>10}  {'index fields that differ':40} engine options")
for fam, r in sorted(rows.items()):
    print(f"{fam:8} {r.get('engine_start_s', float('nan')):>14.1f} {r.get('max_rel_act', float('nan')):>12.2e} "
          f"{r.get('max_rel_logits', float('nan')):>10.2e}  {', '.join(r.get('row_fields_differing', [])):40} {r.get('options', {})}")
EOF
