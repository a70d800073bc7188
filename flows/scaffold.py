"""The scaffold flow: one task that hashes the corpus into `runs/<run_id>/`.

Run it: `tourguide scaffold --run-id nightly --runs-root runs` (the CLI calls `lib.runs` directly
unless PREFECT_API_URL is set or --flow is given; then this flow runs and shows in the UI).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lib.store.runs import ScaffoldSpec, new_run_id
from tasks.scaffold import scaffold_run_task


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"scaffold-{flow_run.parameters.get('run_id') or 'run'}"


@flow(name="scaffold", flow_run_name=_run_name, log_prints=False)
def scaffold_flow(run_id: str | None = None, runs_root: str = "runs", samples_dir: str | None = None,
                  prompts_dir: str | None = None, prompts: list[str] | None = None, tokenizer_name: str | None = None,
                  tokenizer_version: str | None = None, teacher_commit: str | None = None,
                  student_commit: str | None = None) -> dict[str, Any]:
    """Scaffold (or confirm) a run; returns its manifest + {"run_dir", "created"}."""
    spec = ScaffoldSpec(run_id=run_id or new_run_id(), runs_root=runs_root, prompts=tuple(prompts or ()),
                        tokenizer_name=tokenizer_name, tokenizer_version=tokenizer_version,
                        teacher_commit=teacher_commit, student_commit=student_commit,
                        **({"samples_dir": samples_dir} if samples_dir else {}),
                        **({"prompts_dir": prompts_dir} if prompts_dir else {}))
    return scaffold_run_task(spec.model_dump(mode="json"), label=spec.run_id)
