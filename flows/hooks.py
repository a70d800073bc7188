"""State hooks shared by the flows that run as deployments.

`log_failure` (on_failure): the reason a run failed becomes its last ERROR log line, so the end
of `prefect flow-run logs <id>`, the UI's log tab and `prefect deployment run … --watch` (when the
server streams logs: PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and
PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED, README "Prefect") say why, not just "Failed".
"""

from __future__ import annotations

from typing import Any


def log_failure(flow: Any, flow_run: Any, state: Any) -> None:
    from prefect.logging.loggers import flow_run_logger

    flow_run_logger(flow_run, flow).error(
        "%s run %s %s: %s (state message: prefect flow-run inspect %s)", flow.name, flow_run.name,
        state.name.lower(), state.message or "no message", flow_run.id,
        extra={"tourguide_failure": True})  # the CLI's console prints its own one-line failure instead


def cancel_children(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation: cancel every run this one started (capture partitions, fold, QA captures
    on the gpu pool), and theirs, depth first. They are separate flow runs on other workers; the
    server cancels a run_deployment child ~20 s after its parent on its own, this makes it prompt
    and also reaches runs whose link the server does not follow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.logging.loggers import flow_run_logger
    from prefect.states import Cancelled, Cancelling

    log = flow_run_logger(flow_run, flow)
    with get_client(sync_client=True) as client:
        todo, seen = [flow_run.id], set()
        while todo:
            parent = todo.pop()
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
            for child in children:
                if child.id in seen:
                    continue
                seen.add(child.id)
                todo.append(child.id)
                if child.state is not None and not child.state.is_final():
                    why = f"parent {flow_run.name} was cancelled"
                    # A run no worker has started has no process to stop: Cancelled at once. A running
                    # one goes Cancelling, and its worker stops the process and marks it Cancelled.
                    new = Cancelled(message=why) if child.state.is_scheduled() else Cancelling(message=why)
                    client.set_flow_run_state(child.id, new, force=True)
                    log.warning("cancelling child run %s (%s)", child.name, child.id)
