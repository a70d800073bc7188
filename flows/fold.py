"""The fold flow: validate spec → transform + write shards → equivalence gate.

    tourguide fold --checkpoint runs/x/checkpoints/student --output-dir runs/x/checkpoints/rotated \\
                   --spec runs/x/transforms.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.hooks import log_failure
from lib.core.progress import stage
from lib.fold.gate import GateOptions
from lib.fold.options import FoldOptions
from tasks.fold import gate_folded_checkpoint, validate_fold_spec, write_folded_checkpoint
from tasks.names import fold_run_name


# validate_parameters=False: `options` / `gate_options` are validated below by the models' own
# parse, whose errors are BadInputErrors naming the key ("fold_flow options: overwrit: unknown key
# (did you mean 'overwrite'?) …"); Prefect's check would raise a ParameterTypeError instead. The
# parameters stay typed as the models, so the UI renders them as forms (unknown keys refused).
@flow(name="fold", flow_run_name=fold_run_name, log_prints=False, validate_parameters=False, on_failure=[log_failure])
def fold_flow(checkpoint: str, output_dir: str, spec: str, options: FoldOptions | None = None,
              gate_options: GateOptions | None = None, allow_inexact: bool = False,
              allow_outside_paths: bool = False, revision: str | None = None, hf_home: str | None = None,
              hf_hub_cache: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Fold `spec` into `checkpoint` (local folder or cached hub id) and gate the result.
    `options` / `gate_options`: `FoldOptions` / `GateOptions` (or their JSON dicts).
    Returns {'plan', 'fold', 'gate'}; raises GateFailedError when an exact fold fails its gate."""
    fold_opts = FoldOptions.parse(options or {}, "fold_flow options").model_dump(mode="json")
    gate_opts = GateOptions.parse(gate_options or {}, "fold_flow gate_options").model_dump(mode="json")
    label = label or Path(output_dir).name
    with stage(f"fold {label}", total=3, unit="steps (check, write, gate)") as bar:
        plan = validate_fold_spec(checkpoint, spec, output_dir, fold_opts, allow_inexact, allow_outside_paths, revision,
                                  hf_home, hf_hub_cache, label=label)
        bar.advance()
        fold = write_folded_checkpoint(plan["source_dir"], spec, output_dir, fold_opts, allow_inexact,
                                       allow_outside_paths, label=label)
        bar.advance()
        gate = gate_folded_checkpoint(plan["source_dir"], output_dir, spec, gate_opts, allow_inexact,
                                      allow_outside_paths, source_ref=checkpoint, label=label)
        bar.advance()
    get_run_logger().info("fold %s -> %s: %s", checkpoint, output_dir, gate["status"])
    return {"plan": plan, "fold": fold, "gate": gate}
