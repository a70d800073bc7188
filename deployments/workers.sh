#!/usr/bin/env bash
# Start this host's Prefect workers against the server in PREFECT_API_URL: one `gpu` process worker
# per GPU, each pinned to its device (CUDA_VISIBLE_DEVICES=i) and running one flow at a time
# (--limit 1), plus N_CPU `cpu` workers. Flow-run heartbeats are on (every 30 s) so that the
# "Detect zombie flows" automation (setup_pools.sh) can mark a run Crashed when its worker dies.
# Stops all of them on Ctrl-C / SIGTERM, or when any one exits.
#
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api bash deployments/workers.sh [N_GPUS] [N_CPU]
#   N_GPUS default: the GPUs nvidia-smi lists (at least 1, so a CPU-only host still runs capture)
#   N_CPU  default: 1.   TOURGUIDE_HEARTBEAT overrides the heartbeat period (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
if [ -z "${PREFECT_API_URL:-}" ]; then
  echo "workers.sh: PREFECT_API_URL is not set; start deployments/server.sh and export it first" >&2
  exit 2
fi
N_GPUS="${1:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
[ "${N_GPUS:-0}" -ge 1 ] 2>/dev/null || N_GPUS=1
N_CPU="${2:-1}"
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${TOURGUIDE_HEARTBEAT:-30}"
export TOURGUIDE_HOME="${TOURGUIDE_HOME:-$PWD}"
host="$(hostname -s 2>/dev/null || echo host)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < N_GPUS; i++)); do
  CUDA_VISIBLE_DEVICES="$i" "$PREFECT" worker start --pool gpu --limit 1 --name "gpu-$host-$i" &
  pids+=("$!")
done
for ((i = 0; i < N_CPU; i++)); do
  "$PREFECT" worker start --pool cpu --name "cpu-$host-$i" &
  pids+=("$!")
done
echo "workers.sh: $N_GPUS gpu worker(s), $N_CPU cpu worker(s) started (heartbeat ${PREFECT_FLOWS_HEARTBEAT_FREQUENCY}s)" >&2
wait -n
