"""`tourguide pipeline`: align your own student to your teacher, end to end — scaffold, capture
both, solve the transports (+ permutations), fold, equivalence gate, QA, report.

Every `PipelineConfig` field is a flag (derived from the model: a field added there is a flag
here), `--config FILE` (TOML or JSON) sets the same keys and the flags override it. Everything
that can be checked without weights is checked before Prefect starts (lib.pipeline.preflight).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lib.core.flags import add_model_flags, given_flags, model_flags, validate_layers
from lib.pipeline.config import PipelineConfig, default_run_id  # pydantic only: no torch, no prefect

EXAMPLE = """example:
  tourguide pipeline --teacher Qwen/Qwen3-0.6B --student ./my-student --run-id my-student-v1 \\
      --hf-home /data/hf --limit 50 --layers model.layers.10,model.layers.20
  tourguide pipeline --config align.toml --limit 20      # flags override the file's keys
Re-running the same command continues from the caches; another config under the same --run-id
is refused (runs/<id>/pipeline.json records the first one). See README: Align your own student
to your teacher."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline", help="align your own student to your teacher: capture, transports, fold, gate, QA, report",
        description="Runs the whole pipeline for --teacher and --student (local folders written by save_pretrained,\n"
                    "or hub ids already in the HF cache: this tool runs offline): scaffold runs/<run-id>/, capture\n"
                    "both models over the corpus, solve the per-layer and pooled transports (+ GQA head and MLP\n"
                    "neuron permutations), fold them into the student, run the equivalence gate, QA the teacher vs\n"
                    "{student, student rotated, folded student}, write the report, and print a summary.\n"
                    "With --pca-dim (different hidden sizes) nothing is folded; QA compares through the PCA map.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML or JSON file of pipeline keys (the flag names below with '_' for '-', e.g. "
                        "max_length = 64); flags given as well override its keys")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything that needs no weights (models, layers, widths, paths, the run's recorded "
                        "config), print the effective config as JSON (usable as --config) and start nothing")
    g = p.add_argument_group("pipeline config (also the keys of --config)")
    add_model_flags(g, PipelineConfig,
                    default_help={"run_id": "default: STUDENT-to-TEACHER, from the folder or hub names"})
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The effective config: defaults < --config FILE < flags (BadInputError naming the source and key)."""
    from lib.core.options import read_config_file

    flags = model_flags(PipelineConfig)
    layers = []
    if args.config:
        layers.append((args.config, read_config_file(args.config, "pipeline config")))
    layers.append(("command line", given_flags(args, flags)))
    merged = {k: v for _, layer in layers if isinstance(layer, dict) for k, v in layer.items()}
    if "run_id" not in merged and isinstance(merged.get("teacher"), str) and isinstance(merged.get("student"), str):
        layers.append(("default run id", {"run_id": default_run_id(merged["teacher"], merged["student"])}))
    return validate_layers(PipelineConfig, layers, flags)


def run(args: argparse.Namespace) -> int:
    from lib.pipeline.preflight import preflight
    from lib.pipeline.summary import format_summary

    t0 = time.perf_counter()
    cfg = config_from_args(args)
    if cfg.use_deployments is True and not os.environ.get("PREFECT_API_URL"):  # "auto" decides in the flow
        from lib.core.errors import BadInputError

        raise BadInputError("--use-deployments runs capture and fold as gpu deployments, which needs a Prefect server "
                            "with them deployed and gpu workers: export PREFECT_API_URL (README: Deployments), or leave "
                            "the flag out to run every step in this process")
    pre = preflight(cfg)  # before Prefect starts: bad input costs a second, not a throwaway API
    models = [f"  {side}: {pre[side]['ref']} ({pre[side]['revision'][:23]})" for side in ("teacher", "student")]
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        state = "continues the recorded run" if pre["recorded"] else "starts a new run"
        print(f"run folder {pre['run_dir']}: {state}; {len(pre['blocks'])} block(s) to align, {len(pre['hooks'])} hook "
              f"point(s) to capture, widths student {pre['d_student']} / teacher {pre['d_teacher']}, "
              f"{'fold + gate' if pre['fold'] else 'no fold (--pca-dim)'}", *models, sep="\n")
        return 0
    from flows.console import load_flow

    pipeline_flow = load_flow("pipeline")

    summary = pipeline_flow(cfg)
    print(format_summary(summary, time.perf_counter() - t0, title="OfflineTourGuide pipeline", header=models))
    return 0
