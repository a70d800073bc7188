"""Prefect tasks of the nightly QA flow: read the eval config → check the run → (capture, validate:
the capture flow and tasks.validate) → metrics of one variant → the night's summary artifact.

Each task is one lib call with paths, small dicts and digests in and out (tensors stay in the
shards). Bad input fails at once; only transient I/O is retried (tasks.common.RETRY).
Run the whole thing: `tourguide qa --config deployments/eval_template.json`.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lib.qa.eval_config import load_eval_config
from lib.qa.record import RecordContext, prepare_qa, record_metrics
from tasks.common import RETRY
from tasks.names import artifact_key


@task(name="qa-config", task_run_name="qa-config", cache_policy=NO_CACHE, **RETRY)
def load_eval_config_task(config_path: str) -> dict[str, Any]:
    """Parse and check the eval config (every path must exist). Returns its `model_dump(mode="json")`."""
    return load_eval_config(config_path).model_dump(mode="json")


@task(name="qa-prepare", task_run_name="qa-prepare", cache_policy=NO_CACHE, **RETRY)
def prepare_qa_task(config: dict[str, Any], night: str | None = None) -> dict[str, Any]:
    """Require the run scaffolded and its corpus unchanged; fix the night label and timestamp."""
    ctx = prepare_qa(config, night)
    get_run_logger().info("QA of run %s, night %s: %d sample file(s), snapshot %s", ctx["run_id"], ctx["night"],
                          len(ctx["sample_files"]), ctx["snapshot_digest"][:12])
    return ctx


def metrics_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Same night, same captures (index files hash every shard's sha256), same transports and
    metrics → the rows are already in tonight's ledger: a re-run (or a retried crashed run)
    reuses the summary instead of appending duplicates. A new night always recomputes."""
    import hashlib
    from pathlib import Path

    from lib.core.digests import sha256_file

    ctx = parameters["context"]
    h = hashlib.sha256()
    for part in (ctx.get("run_id"), ctx.get("night"), ctx.get("snapshot_digest"), ctx.get("code_version"),
                 parameters["variant"], ",".join(parameters["metrics"]), ",".join(parameters.get("layers") or [])):
        h.update(f"{part}|".encode())
    for idx in (parameters["teacher_index"], parameters["variant_index"]):
        h.update((sha256_file(idx) if idx and Path(idx).exists() else "none").encode())
    for kind, path in parameters.get("transports") or []:
        h.update(f"{kind}:{sha256_file(path) if Path(path).exists() else path}|".encode())
    return f"qa-{parameters['variant']}-{ctx.get('night')}-{h.hexdigest()[:24]}"


@task(name="qa-metrics", task_run_name="qa-{variant}", cache_key_fn=metrics_cache_key, persist_result=True,
      result_serializer="json", **RETRY)
def record_metrics_task(context: dict[str, Any], variant: str, teacher_index: str, variant_index: str | None,
                        metrics: list[str], transports: list[list[str]] | None = None,
                        layers: list[str] | None = None) -> dict[str, Any]:
    """Stream the variant's shards against the teacher's (the teacher's own rows when
    `variant_index` is None) and append the rows to the metrics ledger. Returns a summary."""
    ctx = {k: v for k, v in context.items() if k in RecordContext.model_fields}
    summary = record_metrics(RecordContext.model_validate(ctx), variant, teacher_index, variant_index, metrics,
                             [tuple(t) for t in transports or []], layers or None, verify=False)
    log = get_run_logger()
    log.info("%s: %d row(s) over %d sample(s), %d tokens; %s", variant, summary["n_rows"], summary["n_pairs"],
             summary["n_tokens"], ", ".join(f"{k}={v:.6g}" for k, v in summary["headline"].items() if "[" not in k))
    for note in summary["notes"]:
        log.warning("%s: %s", variant, note)
    return summary


@task(name="qa-summary", task_run_name="qa-summary", cache_policy=NO_CACHE, **RETRY)
def publish_qa_summary_task(context: dict[str, Any], results: list[dict[str, Any]],
                            failures: list[dict[str, str]]) -> str:
    """A markdown artifact listing what each variant recorded tonight and which failed."""
    lines = [f"# QA night {context['night']} — run `{context['run_id']}`", "",
             "| model | rows | samples | tokens | headline |", "|---|---|---|---|---|"]
    for r in results:
        head = ", ".join(f"{k}={v:.4g}" for k, v in r["headline"].items() if "[" not in k)
        lines.append(f"| {r['variant']} | {r['n_rows']} | {r['n_pairs']} | {r['n_tokens']} | {head} |")
    for f in failures:
        lines.append(f"| {f['variant']} | FAILED | | | {f['error'].splitlines()[0][:200].replace('|', '/')} |")
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown=markdown, key=artifact_key("qa-night", context["run_id"]),
                             description=f"QA night {context['night']} of {context['run_id']}")
    return markdown
