"""The rotate flow: validate checksums → plan → one mapped task per layer → pooled Q →
(PCA: mapped cosine pass) → ledger + transforms.json.

Run it: `tourguide rotate --student-index … --teacher-index … --layer model.layers.0 …`
(or `python -m flows rotate …`). Without PREFECT_API_URL, Prefect starts a throwaway API first.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from flows.hooks import log_failure
from lib.core.progress import stage
from lib.store.runs import new_run_id
from lib.transport.options import RotateOptions
from tasks.rotate import (
    layer_label,
    pca_cosine_task,
    plan_rotation_task,
    pool_rotation_task,
    record_rotation_task,
    solve_layer_task,
)
from tasks.names import rotate_run_name
from tasks.validate import validate_shards


# Each layer in flight holds its own O(d²) moments (and, with permutations, O(intermediate²)
# correlations): bound the mapped concurrency. The CLI's --workers overrides it (with_options).
DEFAULT_WORKERS = 2


# validate_parameters=False: `options` is validated below by RotateOptions.parse, whose errors are
# BadInputErrors naming the key ("rotate_flow options: pca_dimm: unknown key …"); Prefect's check
# would raise a ParameterTypeError. The parameter stays typed, so the UI renders it as a form.
@flow(name="rotate", flow_run_name=rotate_run_name, log_prints=False, validate_parameters=False, on_failure=[log_failure],
      task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_WORKERS))
def rotate_flow(student_index: str, teacher_index: str, layers: list[str] | None = None,
                output_dir: str = "rotations", ledger: str | None = None, spec_out: str | None = None,
                options: RotateOptions | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Solve per-layer rotations, the pooled global rotation and (optionally) permutations.
    `options`: `RotateOptions` (or its JSON dict). Returns `lib.transport.record.record_rotation`'s summary."""
    opts = RotateOptions.parse(options or {}, "rotate_flow options").model_dump(mode="json")
    run_id = run_id or new_run_id("rotate")
    validate_shards([student_index, teacher_index], label="rotate")
    plan = plan_rotation_task(student_index, teacher_index, layers, output_dir, ledger, spec_out, opts, run_id)
    names = plan["layers"]
    labels = [layer_label(x) for x in names]
    with stage(f"rotate {run_id}", total=len(names), unit="layers") as bar:
        results = []
        for fut in solve_layer_task.map(unmapped(plan), names, labels):
            results.append(fut.result())
            bar.advance()
    pooled = pool_rotation_task(plan, results)
    cosines = []
    if plan["options"].get("pca_dim") is not None:
        cosines = [f.result() for f in pca_cosine_task.map(unmapped(plan), names, labels)]
    summary = record_rotation_task(plan, results, pooled, cosines)
    get_run_logger().info("rotate %s: %d layer(s) → %s", summary["run_id"], len(names), output_dir)
    return summary
