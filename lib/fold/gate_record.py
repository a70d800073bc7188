"""The gate stage of a fold: run the equivalence gate, then record it — fold_report.json,
a FOLD_FAILED marker on failure, and a row in the run's `fold` ledger.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lib.core.errors import BadInputError, GateFailedError
from lib.fold.checkpoint import FAILED_MARKER, REPORT_NAME, read_report
from lib.fold.checkpoint_io import CheckpointReader
from lib.fold.gate import GateOptions, GateResult, check_equivalence
from lib.fold.transform_set import WeightTransformSet
from lib.store.atomic import write_json, write_text_atomic


def find_run_dir(path: str | os.PathLike) -> Path | None:
    """The nearest folder at or above `path` that has a `ledgers/` folder (a run dir)."""
    p = Path(path).resolve()
    for cand in (p, *p.parents):
        if (cand / "ledgers").is_dir():
            return cand
    return None


def record_fold_ledger(output_dir: str | os.PathLike, result: GateResult, source: str,
                       spec: str | None) -> Path | None:
    """Append one row to the run's `fold` ledger when `output_dir` is inside a run; else None."""
    from lib.store.ledgers import append_rows, ledger_path, now_iso

    run_dir = find_run_dir(output_dir)
    if run_dir is None:
        return None
    run_id = run_dir.name
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        try:
            run_id = json.loads(manifest.read_text()).get("run_id") or run_id
        except json.JSONDecodeError:
            pass
    row = {"run_id": run_id, "recorded_at": now_iso(), "checkpoint": source, "output_dir": str(Path(output_dir).resolve()),
           "exact": result.exact, "passed": result.passed, "max_abs_logit_diff": result.max_abs_logit_diff,
           "mean_kl": result.mean_kl, "top1_agreement": result.top1_agreement,
           "hidden_cosine_min": result.hidden_cosine_min, "spec": spec or "", "status": result.status,
           "dtype": result.checkpoint_dtype, "n_probe_tokens": result.n_tokens}
    return append_rows(ledger_path(run_dir, "fold"), "fold", [row])


def gate_fold(source_dir: str | os.PathLike, output_dir: str | os.PathLike,
              transforms: WeightTransformSet | None = None, options: GateOptions = GateOptions(),
              source_ref: str | None = None, raise_on_failure: bool = True) -> GateResult:
    """Run the gate on a folded checkpoint and record it: fold_report.json (merged with what the
    fold wrote), a FOLD_FAILED marker on failure, the run's fold ledger. Raises GateFailedError
    when an exact fold fails (after recording), unless `raise_on_failure=False`."""
    out = Path(output_dir)
    if not (out / "config.json").is_file():
        raise BadInputError(f"{out}: no folded checkpoint here (no config.json); run the fold first")
    result = check_equivalence(source_dir, out, transforms, options)
    report = read_report(out)
    report.update({"status": result.status, "gate": result.model_dump(mode="json"),
                   "gate_options": options.model_dump(mode="json"),
                   "source": source_ref or str(Path(source_dir).resolve())})
    write_json(out / REPORT_NAME, report)
    marker = out / FAILED_MARKER
    if result.status == "failed":
        write_text_atomic(marker, "The equivalence gate failed for this folded checkpoint; do not use it.\n"
                          + "; ".join(result.failures) + f"\nSee {REPORT_NAME}.\n")
    elif marker.exists():
        marker.unlink()
    spec = transforms.spec_path if transforms is not None else None
    ledger = record_fold_ledger(out, result, source_ref or str(source_dir), spec)
    if ledger is not None:
        report["ledger"] = str(ledger)
        write_json(out / REPORT_NAME, report)
    if result.status == "failed" and raise_on_failure:
        raise gate_failure(out, result, source_ref or str(source_dir))
    return result


def gate_failure(output_dir: str | os.PathLike, result: GateResult, source: str) -> GateFailedError:
    """The error a failed exact fold raises (the CLI prints it and exits 2)."""
    return GateFailedError(
        f"{output_dir}: the folded checkpoint does not reproduce {source}: {'; '.join(result.failures)}. "
        f"The output is marked failed ({FAILED_MARKER}, {REPORT_NAME}); check the spec's transforms "
        "(orthogonality, permutation conventions) and rerun")


def gate_from_spec(source_dir: str | os.PathLike, output_dir: str | os.PathLike, spec_path: str | os.PathLike,
                   options: GateOptions = GateOptions(), *, allow_inexact: bool = False,
                   allow_outside_paths: bool = False, source_ref: str | None = None,
                   raise_on_failure: bool = True) -> GateResult:
    """`gate_fold` with the transforms rebuilt from the spec (for the hidden-state bases)."""
    cfg = CheckpointReader(source_dir).config()
    ts = WeightTransformSet.from_spec(spec_path, cfg, allow_inexact=allow_inexact,
                                      allow_outside_paths=allow_outside_paths)
    return gate_fold(source_dir, output_dir, ts, options, source_ref=source_ref, raise_on_failure=raise_on_failure)
