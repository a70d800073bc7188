"""One QA night: labels (`prepare_qa`), metric rows, and appending them to the metrics ledger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lib.core.errors import BadInputError
from lib.core.options import Frozen
from lib.qa.compare import MetricValue, compare_captures, measure_capture
from lib.qa.eval_config import EvalConfig
from lib.qa.metric_names import LOGIT_METRICS, METRICS, METRICS_VERSION, is_residual_layer
from lib.qa.provenance import record_models


def metric_rows(values: Sequence[MetricValue], *, run_id: str, night: str, timestamp: str, variant: str,
                snapshot_digest: str, code_version: str) -> list[dict[str, Any]]:
    """Rows of the `metrics` ledger (lib.store.ledgers.SCHEMAS['metrics'])."""
    return [{"run_id": run_id, "night": night, "timestamp": timestamp, "variant": variant, "metric": v.metric,
             "layer": v.layer, "sample": v.sample, "value": float(v.value), "n_tokens": int(v.n_tokens),
             "snapshot_digest": snapshot_digest, "code_version": code_version} for v in values]


def code_version(git_commit: str) -> str:
    """What produced a metrics row: the project commit (short) and METRICS_VERSION."""
    return f"{git_commit[:12]}+metrics{METRICS_VERSION}"


class RecordContext(Frozen):
    """Where and under which labels QA rows go (one per QA night); tasks pass it as
    `model_dump(mode="json")`."""

    run_dir: str
    run_id: str
    night: str
    timestamp: str
    snapshot_digest: str
    code_version: str


def record_metrics(ctx: RecordContext, variant: str, teacher_index: str, variant_index: str | None = None,
                   metrics: Sequence[str] = METRICS, transports: Sequence[tuple[str, str]] = (),
                   layers: Sequence[str] | None = None, verify: bool = False) -> dict[str, Any]:
    """Compute (`compare_captures`, or `measure_capture` when `variant_index` is None: the
    teacher's own rows) and append the rows to the run's metrics ledger. Returns a small summary:
    {variant, n_rows, n_pairs, n_tokens, notes, ledger_file, headline: {metric: value}}."""
    from lib.store.ledgers import append_rows, ledger_path

    if variant_index is None:
        result = measure_capture(teacher_index, metrics, layers, verify)
    else:
        result = compare_captures(teacher_index, variant_index, metrics, transports, layers, verify)
    rows = metric_rows(result.values, run_id=ctx.run_id, night=ctx.night, timestamp=ctx.timestamp, variant=variant,
                       snapshot_digest=ctx.snapshot_digest, code_version=ctx.code_version)
    written = append_rows(ledger_path(ctx.run_dir, "metrics"), "metrics", rows)
    headline: dict[str, float] = {}
    for v in result.values:
        if v.sample is None:
            key = v.metric if v.layer is None else f"{v.metric}[{v.layer}]"
            headline[key] = v.value
    return {"variant": variant, "n_rows": len(rows), "n_pairs": result.n_pairs, "n_tokens": result.n_tokens,
            "layers": result.layers, "notes": result.notes, "ledger_file": str(written), "headline": headline}


def prepare_qa(config: Any, night: str | None = None) -> dict[str, Any]:
    """Check that the config's run is scaffolded and its corpus unchanged; fix the night's labels;
    record which checkpoints the night measures (runs/<id>/qa_models.json, lib.qa.provenance).

    `config` is an `EvalConfig` (or its `model_dump`). Returns the `RecordContext` dump plus "sample_files"
    (the snapshot's sample files, to capture), "metric_layers" (the residual hook points among
    the config's `layers`, None = every decoder block) and "logits" (whether a metric needs them)."""
    from datetime import datetime, timezone

    from lib.store.runs import project_commit, verify_snapshot

    cfg = EvalConfig.parse(config)
    if night is not None and (not isinstance(night, str) or not night.strip() or len(night) > 64):
        raise BadInputError(f"night label {night!r}: give a short non-empty label such as 2026-11-27")
    info = verify_snapshot(cfg.runs_root, cfg.run_id)
    # microseconds: two QA runs in one second must still order (the report keeps the latest per night)
    stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    ctx = RecordContext(run_dir=info.run_dir, run_id=cfg.run_id, night=night or stamp[:10], timestamp=stamp,
                        snapshot_digest=info.snapshot_digest, code_version=code_version(project_commit()))
    # Residual metrics only make sense at decoder-block outputs, whatever else is captured.
    metric_layers = [x for x in cfg.layers if is_residual_layer(x)]  # eval_config checked there is one
    record_models(info.run_dir, ctx.night, cfg)  # the report's tokenizer and commits, when no flag gave them
    return {**ctx.model_dump(mode="json"), "sample_files": list(info.sample_files), "metric_layers": metric_layers or None,
            "logits": any(m in LOGIT_METRICS for m in cfg.metrics)}
