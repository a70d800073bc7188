"""The report flow: render report.md + figures from a run's ledgers, publish them as artifacts.

Run it: `tourguide report --run-id nightly --runs-root runs` (runs this flow when PREFECT_API_URL
is set or --flow is given; otherwise renders directly, without Prefect start-up).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.hooks import log_failure
from tasks.report import publish_report_task, render_report_task


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"report-{flow_run.parameters.get('run_id', 'run')}"


@flow(name="report", flow_run_name=_run_name, log_prints=False, on_failure=[log_failure])
def report_flow(run_id: str, runs_root: str = "runs", failures: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Returns the `ReportResult` (`model_dump(mode="json")`) plus "artifacts": {kind: artifact key}."""
    rendered = render_report_task(run_id, runs_root, failures)
    keys = publish_report_task(rendered, label=run_id)
    return {**rendered, "artifacts": keys}
