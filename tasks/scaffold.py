"""The scaffold task: hash the corpus and lay out `runs/<run_id>/` (one `lib.runs` call).

Run it through the flow or the CLI: `tourguide scaffold --run-id nightly --runs-root runs`.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lib.store.runs import ScaffoldSpec, scaffold_run
from tasks.common import RETRY
from tasks.names import artifact_key


@task(name="scaffold-run", task_run_name="scaffold-{label}", cache_policy=NO_CACHE, **RETRY)
def scaffold_run_task(spec: dict[str, Any], label: str = "run") -> dict[str, Any]:
    """`spec` is a `ScaffoldSpec.model_dump(mode="json")`. Returns the manifest + {"run_dir", "created"}; raises
    BadInputError (never retried) when the same run id exists with different inputs."""
    manifest = scaffold_run(ScaffoldSpec.model_validate(spec))
    log = get_run_logger()
    verb = "created" if manifest["created"] else "unchanged (same inputs)"
    log.info("run %s %s: snapshot %s, %d blurbs in %d sample file(s), %d prompt file(s)", manifest["run_dir"], verb,
             manifest["snapshot_digest"][:12], manifest["n_blurbs"], manifest["n_sample_files"], manifest["n_prompt_files"])
    if manifest["created"]:
        create_markdown_artifact(
            markdown=f"# Run `{manifest['run_id']}`\n\n| field | value |\n|---|---|\n"
                     f"| folder | `{manifest['run_dir']}` |\n| snapshot digest | `{manifest['snapshot_digest']}` |\n"
                     f"| blurbs | {manifest['n_blurbs']} |\n| prompt files | {manifest['n_prompt_files']} |\n"
                     f"| project commit | `{manifest['git_commit']}` |\n",
            key=artifact_key("scaffold", manifest["run_id"]), description=f"scaffold of run {manifest['run_id']}")
    return manifest
