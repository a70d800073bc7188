"""Prefect tasks of the demo flow: the demo teacher (trained once, cached), the planted student,
and how well the pipeline recovered the planted transforms. One lib.demo call each."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lib.demo.planted import ensure_planted_student, recovery_from_spec
from lib.demo.teacher import DemoRecipe, ensure_demo_teacher
from lib.store.staging import link_folder
from tasks.common import RETRY


@task(name="demo-teacher", task_run_name="demo-teacher", cache_policy=NO_CACHE, **RETRY)
def demo_teacher_task(recipe: dict[str, Any]) -> str:
    """Folder of the demo teacher for `recipe` (trained the first time, then reused from disk)."""
    return str(ensure_demo_teacher(DemoRecipe.model_validate(recipe), log=get_run_logger().info))


@task(name="plant-student", task_run_name="plant-student", cache_policy=NO_CACHE, **RETRY)
def plant_student_task(teacher: str, out_dir: str, seed: int, noise: float) -> dict[str, Any]:
    """A student = teacher with planted transforms + noise (reused when already planted alike)."""
    _, built = ensure_planted_student(teacher, out_dir, seed=seed, noise=noise)
    return {"student": out_dir, "built": built}


@task(name="recovery", task_run_name="recovery", cache_policy=NO_CACHE, **RETRY)
def recovery_task(student: str, spec: str) -> dict[str, Any]:
    """How close the solved transforms are to the inverse of the planted ones."""
    return recovery_from_spec(student, spec)




@task(name="link-teacher", task_run_name="link-teacher", cache_policy=NO_CACHE, **RETRY)
def link_teacher_task(teacher: str, link: str) -> str:
    """`link` (runs/<run>/checkpoints/teacher) → the cached teacher folder: the run's own path for
    it, which the nightly QA config and the pipeline deployment's defaults name."""
    return str(link_folder(teacher, link))
