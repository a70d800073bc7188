"""One run id, one pipeline config: `runs/<id>/pipeline.json` records the effective config the
first time a pipeline runs under a run id; a later run under that id must match it.

A re-run with the same config continues from the caches (captures, the fold, tonight's QA
metrics). A different config under the same id would mix two experiments in one run folder
(its ledgers, report, eval config), so it is refused with the difference shown, the way
`tourguide scaffold` refuses a changed corpus.

Compared: every `PipelineConfig` field except `RESULT_NEUTRAL` (a field added later is compared
unless it is listed there; `device` as written: `auto` is not resolved, since with deployments
the flow runs on another machine than the command), plus what the fields point at — the resolved
content revision of the teacher and the student (a checkpoint rewritten in place is a different
experiment) — and the permutations as solved (none with `pca_dim`). Not compared
(`RESULT_NEUTRAL`): where things run and how the work is split — none of them changes a number
the run records:

    run_id, runs_root       name the folder itself
    batch_size              not part of any capture key (padding is masked; rows are per sample)
    hf_home, hf_hub_cache   where hub ids are looked up; the resolved revision is compared instead
    use_deployments, partitions, dask_address, dask_workers
                            the same tasks on other workers / task runners

The record is written atomically (temp + fsync + rename) under a lock, so two pipelines racing
on one new run id cannot both claim it with different configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lib.core.errors import BadInputError
from lib.pipeline.config import PipelineConfig
from lib.store.atomic import locked, write_text_atomic

RECORD_NAME = "pipeline.json"
RECORD_VERSION = 1

RESULT_NEUTRAL = frozenset({"run_id", "runs_root", "batch_size", "hf_home", "hf_hub_cache", "use_deployments",
                            "partitions", "dask_address", "dask_workers"})


def run_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What must match for a re-run under the same run id (see the module doc)."""
    from lib.models.loading import resolve_model

    ident = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESULT_NEUTRAL}
    ident["solve_permutations"] = cfg.permutations  # with pca_dim none are solved, whatever the flag says
    for side in ("teacher", "student"):
        ident[f"{side}_revision"] = resolve_model(getattr(cfg, side), hf_home=cfg.hf_home,
                                                  hf_hub_cache=cfg.hf_hub_cache).revision
    return ident


def _defaults() -> dict[str, Any]:
    """Field defaults as JSON values: a record written before a field existed had its default."""
    return {k: f.get_default(call_default_factory=True) for k, f in PipelineConfig.model_fields.items()
            if not f.is_required()}


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc}); restore it from a backup or pick a new --run-id") from None
    if not isinstance(data, dict) or not isinstance(data.get("compared"), dict):
        raise BadInputError(f"{path}: not a pipeline record (no 'compared' object); restore it or pick a new --run-id")
    return data


def config_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old → new' for every compared key that differs (keys missing on one side take the
    field's default: records from before a field existed still compare)."""
    defaults = _json(_defaults())
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if old != new:
            lines.append(f"{key}: {_fmt(old)} → {_fmt(new)}")
    return lines


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=list))


def _fmt(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if value is not None else "(unset)"


def check_run_record(cfg: PipelineConfig, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Raise BadInputError (listing the differences) when `cfg`'s run folder holds a record of
    another config; return the identity compared."""
    identity = run_identity(cfg) if identity is None else identity
    record = read_record(cfg.run_dir())
    if record is not None:
        changes = config_differences(record["compared"], identity)
        if changes:
            path = cfg.run_dir() / RECORD_NAME
            raise BadInputError(
                f"run {cfg.run_dir()} already holds a pipeline run with a different config ({path}):\n  "
                + "\n  ".join(changes)
                + f"\nFix: pick a new --run-id for the new config, or restore the recorded values (fields that do "
                  f"not change results may differ: {', '.join(sorted(RESULT_NEUTRAL - {'run_id', 'runs_root'}))}).")
    return identity


def claim_run(cfg: PipelineConfig) -> dict[str, Any]:
    """Check `cfg` against the run's record and write the record when there is none yet.
    Returns {"path", "created", "compared"}."""
    identity = run_identity(cfg)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir / ".pipeline.lock"):
        check_run_record(cfg, identity)
        path = run_dir / RECORD_NAME
        created = not path.exists()
        if created:
            from lib.store.ledgers import now_iso

            body = {"version": RECORD_VERSION, "run_id": cfg.run_id, "recorded_at": now_iso(),
                    "config": cfg.model_dump(mode="json"), "compared": identity,
                    "not_compared": sorted(RESULT_NEUTRAL)}
            write_text_atomic(path, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return {"path": str(path), "created": created, "compared": identity}
