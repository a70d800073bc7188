"""Prefect tasks of the rotate flow: plan → solve one layer (mapped) → pool → PCA cosines
(mapped, PCA only) → record. Each is one `lib.transports` call; plans and results are small
JSON-able dicts, tensors only ever travel as files under --output-dir. Bad input (BadInputError)
fails at once; only transient I/O is retried (tasks.common.RETRY). Run names: rotate-L03 …
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lib.transport.options import RotateOptions
from lib.transport.plan import RotationPlan, plan_rotation
from lib.transport.pool import pca_cosines, pool_rotation
from lib.transport.record import fmt_value, record_rotation
from lib.transport.solve import solve_layer
from tasks.common import RETRY
from tasks.names import path_key


@task(name="rotate-plan", task_run_name="rotate-plan", cache_policy=NO_CACHE, **RETRY)
def plan_rotation_task(student_index: str, teacher_index: str, layers: list[str] | None, output_dir: str,
                       ledger: str | None = None, spec_out: str | None = None, options: dict[str, Any] | None = None,
                       run_id: str | None = None) -> dict[str, Any]:
    """Pair the tokens and check every input (writes nothing). Returns the plan as a dict."""
    plan = plan_rotation(student_index, teacher_index, layers, output_dir, ledger=ledger, spec_out=spec_out,
                         options=RotateOptions.model_validate(options or {}), run_id=run_id)
    get_run_logger().info("rotate %s: %d layer(s), %d paired tokens from %d sample(s) (%d/%d unpaired), d %d→%d",
                          plan.run_id, len(plan.layers), plan.n_tokens, len(plan.pairs), plan.unpaired_student,
                          plan.unpaired_teacher, plan.d_student, plan.d_teacher)
    return plan.model_dump(mode="json")


@task(name="rotate-layer", task_run_name="rotate-{label}", cache_policy=NO_CACHE, **RETRY)
def solve_layer_task(plan: dict[str, Any], layer: str, label: str = "layer") -> dict[str, Any]:
    """Stream one layer's paired rows once; write its moments, rotation (and permutations)."""
    result = solve_layer(RotationPlan.model_validate(plan), layer)
    get_run_logger().info("%s: %d tokens, cos before %s, after %s, relative residual %s (%.1f s)", layer,
                          result["n_tokens"], fmt_value(result["cosine_before"]), fmt_value(result["cosine_after"]),
                          fmt_value(result["fit_residual"], ".3g"), result["seconds"])
    return result


@task(name="rotate-pool", task_run_name="rotate-pool", cache_policy=NO_CACHE, **RETRY)
def pool_rotation_task(plan: dict[str, Any], layer_results: list[dict[str, Any]]) -> dict[str, Any]:
    """The one foldable rotation Q = polar(Σ w_l C_l) from the saved moments."""
    pooled = pool_rotation(RotationPlan.model_validate(plan), layer_results)
    get_run_logger().info("pooled rotation → %s (det %+.0f)", pooled["rotation_path"], pooled["det"])
    return pooled


@task(name="rotate-pca-cosine", task_run_name="rotate-cos-{label}", cache_policy=NO_CACHE, **RETRY)
def pca_cosine_task(plan: dict[str, Any], layer: str, label: str = "layer") -> dict[str, Any]:
    """PCA only: the per-token cosines of the k-space maps (a second pass over the layer)."""
    return pca_cosines(RotationPlan.model_validate(plan), layer)


@task(name="rotate-record", task_run_name="rotate-record", cache_policy=NO_CACHE, **RETRY)
def record_rotation_task(plan: dict[str, Any], layer_results: list[dict[str, Any]], pooled: dict[str, Any],
                         cosines: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Append the ledger rows, write --spec-out, post the table as a markdown artifact."""
    summary = record_rotation(RotationPlan.model_validate(plan), layer_results, pooled, cosines or [])
    create_markdown_artifact(markdown=rotation_markdown(summary),
                             key=path_key("rotations", plan.get("output_dir"), summary["run_id"]),
                             description=f"rotate {summary['run_id']}")
    return summary


def rotation_markdown(summary: dict[str, Any]) -> str:
    """The rotation table as the UI shows it: a narrow markdown table (the fixed-width text table
    is ~140 characters wide, and the UI cuts a code block to its column), then the notes."""
    from lib.qa.report import md_table

    rows = summary.get("layers") or []
    perm = any(r.get("permutations") for r in rows)
    header = ["layer", "cos before", "cos R_l", "cos Q", "resid Q", "‖R_l−Q‖"] + (["heads sim", "mlp corr"] if perm else [])
    body = []
    for r in rows:
        p = r.get("permutations") or {}
        body.append([layer_label(r["layer"]), fmt_value(r.get("cosine_before")), fmt_value(r.get("cosine_after")),
                     fmt_value(r.get("cosine_global")), fmt_value(r.get("fit_residual_global")),
                     fmt_value(r.get("dist_to_global"), ".3f")]
                    + ([fmt_value(p.get("heads_mean_similarity")), fmt_value(p.get("mlp_mean_correlation"))] if perm else []))
    notes = str(summary.get("table", "")).splitlines()[1 + len(rows):]  # record_rotation's notes follow its table
    return (f"# Rotations {summary['run_id']}\n\n{md_table(header, body)}\n\n"
            + "".join(f"- {n}\n" for n in notes) + "\nR_l: the layer's own rotation; Q: the pooled global rotation "
            "(the one that folds).\n")


def layer_label(layer: str) -> str:
    """'model.layers.3' → 'L03'; other hook points keep their name."""
    tail = layer.rsplit(".", 1)[-1]
    return f"L{int(tail):02d}" if layer.startswith("model.layers.") and tail.isdigit() else layer
