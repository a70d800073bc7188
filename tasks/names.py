"""Run names and artifact keys, in one place (README "Prefect": names in the UI).

Flow runs carry the run they work for, read from their output paths (`runs/<run>/activations/…`,
`…/checkpoints/<name>`, `…/rotations`), so the same name appears whether the flow ran in-process
or as a deployment child:

    capture-<run>-<side>          the pipeline's captures (activations/transport-<side>)
    capture-<run>-qa-<variant>    QA's captures (activations/qa/<variant>)
    fold-<run>-<name>             checkpoints/<name>
    rotate-<run>, qa-<run>, report-<run>, scaffold-<run>, pipeline-<run>
    nightly-<date>                a QA run of a scheduled deployment (qa/nightly): the scheduled
                                  start date in the schedule's timezone

Outside a run folder a capture is named after its model (`capture-<model>`), a fold after its
output folder. Name callables never raise: a name is not worth failing a run for.

Artifact keys (`artifact_key`) are lowercase letters, digits and dashes, and name the thing and
the run, never the time: a re-run adds a version under the same key instead of a new key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Sub-folders of runs/<run>/ whose contents name the run they belong to.
RUN_FOLDERS = ("activations", "checkpoints", "rotations")
# Files named by their folder (a capture's index, a spec); any other name is a folder (`model.v2`).
FILE_SUFFIXES = (".jsonl", ".json", ".safetensors")


def slug(text: str, max_len: int = 100) -> str:
    """Lowercase letters, digits and single dashes (Prefect's artifact-key rule), never empty."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s[:max_len].strip("-") or "x"


def artifact_key(kind: str, *parts: str | None) -> str:
    """`<kind>-<part>-…` slugified; empty parts are left out."""
    return slug("-".join([kind, *(p for p in parts if p)]))


def place_in_run(path: str | None) -> tuple[str | None, str]:
    """(run id, name inside the run) of a path under a run folder, else (None, folder name).

    runs/demo/activations/transport-student        → ("demo", "student")
    runs/demo/activations/qa/teacher/metadata.jsonl → ("demo", "qa-teacher")
    runs/demo/checkpoints/student-folded           → ("demo", "student-folded")
    runs/demo/rotations                            → ("demo", "")
    """
    if not path:
        return None, ""
    p = Path(str(path))
    if p.suffix in FILE_SUFFIXES:  # an index or a spec file: name its folder
        p = p.parent
    parts = p.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in RUN_FOLDERS:
            rest = "-".join(parts[i + 1:])
            if parts[i] == "activations":
                rest = rest.removeprefix("transport-")
            return parts[i - 1], rest
    return None, p.name


def path_key(kind: str, path: str | None, fallback: str | None = None) -> str:
    """The artifact key of what lives at `path`: `<kind>-<run>-<name>` under a run folder, else
    `<kind>-<fallback>-<folder name>`."""
    run, name = place_in_run(path)
    return artifact_key(kind, run, name) if run else artifact_key(kind, fallback, name)


def model_slug(model: str) -> str:
    """A model reference's last path part (`Qwen/Qwen3-0.6B` → `Qwen3-0.6B`)."""
    return Path(str(model).rstrip("/")).name or str(model)


def _named(kind: str, path: str | None, fallback: str) -> str:
    run, name = place_in_run(path)
    if run:
        return "-".join(x for x in (kind, run, name) if x)
    return f"{kind}-{fallback}" if fallback else kind


def capture_name(output_dir: str | None, model: str | None) -> str:
    return _named("capture", output_dir, model_slug(model or "model"))


def fold_name(output_dir: str | None, label: str | None = None) -> str:
    return _named("fold", output_dir, label or place_in_run(output_dir)[1])


def rotate_name(output_dir: str | None, run_id: str | None = None) -> str:
    return _named("rotate", output_dir, run_id or "")


def qa_name(config: str | None, night: str | None = None) -> str:
    """qa-<run id from the eval config>[-<night>] (the config's file name when unreadable)."""
    run_id = None
    try:
        from lib.core.options import read_config_file

        run_id = read_config_file(str(config)).get("run_id")
    except Exception:  # unreadable or bad config: the flow itself reports that, clearly
        pass
    label = run_id if isinstance(run_id, str) and run_id else Path(str(config or "config")).stem
    return f"qa-{label}" + (f"-{night}" if night else "")


def scheduled_name(flow_run_id: Any, scheduled: Any) -> str | None:
    """`<deployment>-<date>` when run `flow_run_id` itself (not a parent) came from a deployment
    that has a schedule: the scheduled start date in the schedule's timezone. Else None."""
    from datetime import timezone
    from zoneinfo import ZoneInfo

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if run.deployment_id is None:
            return None
        dep = client.read_deployment(run.deployment_id)
    if not dep.schedules:
        return None
    zones = [tz for s in dep.schedules if (tz := getattr(s.schedule, "timezone", None))]
    when = scheduled or run.expected_start_time
    when = when.astimezone(ZoneInfo(zones[0]) if zones else timezone.utc)
    return f"{slug(dep.name)}-{when:%Y-%m-%d}"


def current_parameters() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters or {})


def safe_name(make: Any, fallback: str) -> str:
    """`make()`, or `fallback` when it raises (Prefect would otherwise fail the run over its name)."""
    try:
        name = make()
    except Exception:
        return fallback
    return name if isinstance(name, str) and name else fallback


def capture_run_name() -> str:
    def make() -> str:
        p = current_parameters()
        part = p.get("partition")  # a partition child: capture-…-p1of4
        return capture_name(p.get("output_dir"), p.get("model")) + (
            f"-p{part}of{p.get('partitions')}" if part is not None else "")

    return safe_name(make, "capture")


def fold_run_name() -> str:
    return safe_name(lambda: fold_name((p := current_parameters()).get("output_dir"), p.get("label")), "fold")


def rotate_run_name() -> str:
    return safe_name(lambda: rotate_name((p := current_parameters()).get("output_dir"), p.get("run_id")), "rotate")


def qa_run_name() -> str:
    def make() -> str:
        from prefect.runtime import flow_run

        p = current_parameters()
        nightly = None
        try:
            nightly = scheduled_name(flow_run.id, flow_run.scheduled_start_time)
        except Exception:  # no API (an in-process run without a server) or a transient error
            nightly = None
        return nightly or qa_name(p.get("config"), p.get("night"))

    return safe_name(make, "qa")
