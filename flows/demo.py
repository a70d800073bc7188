"""The offline demo: demo teacher (built once, cached) → planted student → pipeline → recovery.

Run it: `tourguide demo` (the README's main command). Prefect's ephemeral API, no server.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.pipeline import pipeline_flow
from lib.demo.planted import compare_recovery, ensure_planted_student, solved_from_spec
from lib.demo.teacher import DemoRecipe, ensure_demo_teacher
from lib.pipeline.config import PipelineConfig


@task(name="demo-teacher", task_run_name="demo-teacher")
def demo_teacher_task(recipe: dict[str, Any]) -> str:
    """Folder of the demo teacher for `recipe` (trained the first time, then reused from disk)."""
    log = get_run_logger()
    return str(ensure_demo_teacher(DemoRecipe(**recipe), log=log.info))


@task(name="plant-student", task_run_name="plant-student")
def plant_student_task(teacher: str, out_dir: str, seed: int, noise: float) -> dict[str, Any]:
    _, built = ensure_planted_student(teacher, out_dir, seed=seed, noise=noise)
    return {"student": out_dir, "built": built}


@task(name="recovery", task_run_name="recovery")
def recovery_task(student: str, spec: str) -> dict[str, Any]:
    """How close the solved transforms are to the inverse of the planted ones."""
    from lib.demo.planted import PLANTED_NAME, Planted

    planted = Planted.load(Path(student) / PLANTED_NAME)
    q, heads, neurons = solved_from_spec(spec)
    return asdict(compare_recovery(planted, q, heads, neurons))


@flow(name="demo", flow_run_name="demo-{run_id}", log_prints=False)
def demo_flow(run_id: str = "demo", runs_root: str = "runs", noise: float = 0.01, seed: int = 0,
              limit: int | None = None, max_length: int | None = 64, batch_size: int = 32, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build/reuse the teacher, plant a student, run the pipeline; return its summary plus recovery."""
    teacher = demo_teacher_task(asdict(DemoRecipe(**(recipe or {}))))
    student = str(Path(runs_root) / run_id / "checkpoints" / "student")
    plant_student_task(teacher, student, seed, noise)
    cfg = PipelineConfig(run_id=run_id, runs_root=runs_root, teacher=teacher, student=student, limit=limit,
                         max_length=max_length, batch_size=batch_size)
    summary = pipeline_flow(cfg)
    summary["recovery"] = recovery_task(student, summary["rotate"]["spec"])
    summary["teacher"] = teacher
    summary["student"] = student
    return summary
