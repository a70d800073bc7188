#!/usr/bin/env bash
# Idempotent Prefect set-up for OfflineTourGuide against the server in PREFECT_API_URL:
#   - a `cpu` process work pool (transports, QA, report, the pipeline's orchestration),
#   - a `gpu` process work pool (capture, fold): start one worker per GPU with --limit 1,
#   - a `gpu` global concurrency limit (one slot per GPU, default 1) for GPU-heavy code paths,
#   - the "Crash zombie flows" automation (Prefect's "Detect zombie flows"): a flow run whose
#     heartbeats stop (its worker died) is marked Crashed after TOURGUIDE_ZOMBIE_SECONDS without
#     one; a partitioned capture then dispatches that partition again. Default 300: well over
#     the 180 s heartbeat period every Prefect process uses unless told otherwise (a pipeline run
#     in-process against this server, say), which a shorter window would mark Crashed while it is
#     healthy. Where every process sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 (workers.sh does for
#     its workers), 90 detects a dead worker sooner.
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api bash deployments/setup_pools.sh [N_GPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
PY="${PY:-.venv/bin/python}"
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
"$PY" - "${TOURGUIDE_ZOMBIE_SECONDS:-300}" <<'PYEOF'
import asyncio
import sys
from datetime import timedelta

from prefect.automations import AutomationCore
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "Crash zombie flows"
ENDS = {f"prefect.flow-run.{s}" for s in ("heartbeat", "Completed", "Failed", "Cancelled", "Crashed")}
automation = AutomationCore(
    name=NAME, description="Marks a flow run Crashed when its heartbeats stop (deployments/setup_pools.sh)",
    trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect=ENDS,
                         match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                         for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                         within=timedelta(seconds=float(sys.argv[1]))),
    actions=[ChangeFlowRunState(state=StateType.CRASHED, message="Flow run marked as crashed due to missing heartbeats.")])


async def main() -> None:
    async with get_client() as client:
        found = await client.read_automations_by_name(NAME)
        if found:
            await client.update_automation(found[0].id, automation)
            print(f"automation '{NAME}' updated (within {sys.argv[1]} s)")
        else:
            await client.create_automation(automation)
            print(f"automation '{NAME}' created (within {sys.argv[1]} s)")


asyncio.run(main())
PYEOF
