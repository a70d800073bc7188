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
