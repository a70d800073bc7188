"""Prefect tasks of the report flow: render report.md + figures (lib.report), then publish them as
a markdown artifact and table artifacts. Run: `tourguide report --run-id nightly --runs-root runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lib.qa.report import embed_figures, render_report
from tasks.common import RETRY
from tasks.names import artifact_key


@task(name="report-render", task_run_name="report-{run_id}", cache_policy=NO_CACHE, **RETRY)
def render_report_task(run_id: str, runs_root: str = "runs", failures: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Write runs/<id>/report.md and its figures; returns the `ReportResult` (`model_dump(mode="json")`)."""
    result = render_report(runs_root, run_id, failures or [])
    get_run_logger().info("report %s: night %s, %d summary row(s), %d figure(s)", result.report_path,
                          result.latest_night, len(result.summary), len(result.figures))
    return result.model_dump(mode="json")


@task(name="report-publish", task_run_name="report-publish-{label}", cache_policy=NO_CACHE, **RETRY)
def publish_report_task(rendered: dict[str, Any], label: str = "run") -> dict[str, str]:
    """The report as a markdown artifact (key `qa-report-<run id>`) plus table artifacts for the
    summary, each per-layer metric and the night-to-night changes. Returns {kind: artifact key}."""
    run_id = rendered["run_id"]
    report = Path(rendered["report_path"])
    markdown = embed_figures(report.read_text(encoding="utf-8"), report.parent)  # the UI cannot read the run folder
    figures = "\n".join(f"- `{p}`" for p in rendered["figures"].values())
    if figures:
        markdown += f"\nFigure files:\n{figures}\n"
    keys = {"report": artifact_key("qa-report", run_id)}
    create_markdown_artifact(markdown=markdown, key=keys["report"], description=f"QA report of run {run_id}")
    tables = {"summary": rendered["summary"], "changes": rendered["changes"]}
    tables.update({f"layers-{m}": rows for m, rows in rendered["per_layer"].items()})
    for kind, rows in tables.items():
        if rows:
            keys[kind] = artifact_key(f"qa-{kind}", run_id)
            create_table_artifact(table=rows, key=keys[kind],
                                  description=f"{kind} of run {run_id}, night {rendered['latest_night']}")
    return keys
