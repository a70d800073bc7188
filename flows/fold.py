"""The fold flow: validate spec → transform + write shards → equivalence gate.

    tourguide fold --checkpoint runs/x/checkpoints/student --output-dir runs/x/checkpoints/rotated \\
                   --spec runs/x/transforms.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tasks.fold import gate_folded_checkpoint, validate_fold_spec, write_folded_checkpoint


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"fold-{params.get('label') or Path(params['output_dir']).name}"


@flow(name="fold", flow_run_name=_run_name, log_prints=False)
def fold_flow(checkpoint: str, output_dir: str, spec: str, options: dict[str, Any] | None = None,
              gate_options: dict[str, Any] | None = None, allow_inexact: bool = False,
              allow_outside_paths: bool = False, revision: str | None = None, hf_home: str | None = None,
              hf_hub_cache: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Fold `spec` into `checkpoint` (local folder or cached hub id) and gate the result.
    `options` / `gate_options` are `FoldOptions.to_dict()` / `GateOptions.to_dict()`.
    Returns {'plan', 'fold', 'gate'}; raises GateFailedError when an exact fold fails its gate."""
    label = label or Path(output_dir).name
    options = dict(options or {})
    plan = validate_fold_spec(checkpoint, spec, output_dir, options, allow_inexact, allow_outside_paths, revision,
                              hf_home, hf_hub_cache, label=label)
    fold = write_folded_checkpoint(plan["source_dir"], spec, output_dir, options, allow_inexact,
                                   allow_outside_paths, label=label)
    gate = gate_folded_checkpoint(plan["source_dir"], output_dir, spec, dict(gate_options or {}), allow_inexact,
                                  allow_outside_paths, source_ref=checkpoint, label=label)
    get_run_logger().info("fold %s -> %s: %s", checkpoint, output_dir, gate["status"])
    return {"plan": plan, "fold": fold, "gate": gate}
