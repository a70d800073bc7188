"""The offline demo: demo teacher (built once, cached) → planted student → pipeline → recovery.

Run it: `tourguide demo` (the README's main command): on the `tourguide server` when one runs, else
Prefect's throwaway API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.hooks import log_failure
from flows.pipeline import pipeline_flow
from lib.demo.teacher import DemoRecipe
from lib.pipeline.config import PipelineConfig
from tasks.demo import demo_teacher_task, link_teacher_task, plant_student_task, recovery_task


# validate_parameters=False: `recipe` is validated by DemoRecipe.parse (a BadInputError naming the
# key) rather than by Prefect (a ParameterTypeError); the UI still renders it as a form.
@flow(name="demo", flow_run_name="demo-{run_id}", log_prints=False, validate_parameters=False, on_failure=[log_failure])
def demo_flow(run_id: str = "demo", runs_root: str = "runs", noise: float = 0.01, seed: int = 0,
              limit: int | None = None, max_length: int | None = 64, batch_size: int = 32,
              recipe: DemoRecipe | None = None) -> dict[str, Any]:
    """Build/reuse the teacher, plant a student, run the pipeline; return its summary plus recovery."""
    recipe = DemoRecipe.parse(recipe or {}, "demo_flow recipe")
    cached = demo_teacher_task(recipe.model_dump(mode="json"))
    checkpoints = Path(runs_root) / run_id / "checkpoints"
    # The run names the teacher by its own path (a link to the cache): runs/demo/eval_config.json
    # (the nightly QA config) and the pipeline deployment's defaults find it there.
    teacher = link_teacher_task(cached, str(checkpoints / "teacher"))
    student = str(checkpoints / "student")
    plant_student_task(cached, student, seed, noise)
    cfg = PipelineConfig(run_id=run_id, runs_root=runs_root, teacher=teacher, student=student, limit=limit,
                         max_length=max_length, batch_size=batch_size)
    summary = pipeline_flow(cfg)
    summary["recovery"] = recovery_task(student, summary["rotate"]["spec"])
    summary["teacher"] = teacher
    summary["student"] = student
    return summary
