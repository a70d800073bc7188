"""`tourguide rotate`: per-layer Procrustes rotations, one pooled global rotation, and (with
--solve-permutations) GQA-correct head and MLP-neuron permutations, from two captures."""

from __future__ import annotations

import argparse

from flows.commands.fanout import add_fanout_flags, fanout_from_args


def _weight(text: str) -> tuple[str, float]:
    layer, sep, w = text.rpartition("=")
    if not sep or not layer:
        raise argparse.ArgumentTypeError(f"expected LAYER=WEIGHT (e.g. model.layers.3=2.0), got {text!r}")
    try:
        return layer, float(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight {w!r} in {text!r} is not a number") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rotate", help="solve student→teacher rotations (per layer + one pooled global Q) and permutations",
        description="Align a student's residual stream with a teacher's over the samples both captured (paired by "
                    "text sha256 and token position). Checks every shard's checksum, then streams the shards once "
                    "per layer into float64 moments (memory O(d²) whatever the token count) and solves: per layer "
                    "R_l = polar(Σ xᵀy) (diagnostics), and the one rotation that folds exactly, Q = polar(Σ_l w_l C_l). "
                    "Writes <output-dir>/<layer>.safetensors, <output-dir>/global.safetensors and stats/ (the "
                    "moments), appends one row per layer to --ledger and prints a table. Convention: the student "
                    "residual x maps to x @ Q ≈ the teacher's.",
        epilog="Different hidden sizes need --pca-dim K: PCA each side to K, Procrustes in K-space; the square "
               "student-side completion is the foldable Q, and the teacher projection is saved as a QA adapter "
               "(global.qa_adapter.safetensors). --solve-permutations also matches MLP neurons (down_proj inputs) and "
               "attention heads (o_proj inputs, two-level under GQA) — capture those module inputs on both sides, "
               "e.g. --layer model.layers.0.mlp.down_proj:input --layer model.layers.0.self_attn.o_proj:input — and "
               "writes permutations/<layer>.{mlp,heads}.safetensors; --spec-out writes transforms.json for "
               "`tourguide fold`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student-index", required=True, help="the student capture's metadata.jsonl (or its folder)")
    p.add_argument("--teacher-index", required=True, help="the teacher capture's metadata.jsonl (or its folder)")
    p.add_argument("--layer", action="append", default=None, metavar="HOOK",
                   help="hook point to align, repeatable (e.g. model.layers.3: the residual after block 3); "
                        "default: every module output captured on both sides")
    p.add_argument("--output-dir", default="rotations", help="folder for the rotation files (created if missing)")
    p.add_argument("--ledger", default=None,
                   help="append one row per layer here: a .jsonl file (JSON lines) or a .parquet / plain folder "
                        "(parquet ledger with the declared schema); default: no ledger")
    p.add_argument("--pca-dim", type=int, default=None, metavar="K",
                   help="PCA both sides to K dims and solve in K-space (required when the hidden sizes differ)")
    p.add_argument("--exclude-position0", action="store_true",
                   help="leave out position 0 of every sample (BOS / attention-sink tokens); recorded in the ledger")
    p.add_argument("--layer-weight", action="append", type=_weight, default=None, metavar="LAYER=W",
                   help="weight of a layer in the pooled rotation (repeatable; others 1.0)")
    p.add_argument("--pool-scale", default="raw", choices=["raw", "normalized"],
                   help="raw: Q = polar(Σ w_l C_l) as is (layers with larger residuals weigh more); normalized: "
                        "divide each C_l by sqrt(tr Sx_l · tr Sy_l) first")
    p.add_argument("--cosine-tokens", type=int, default=16384,
                   help="tokens behind the after-rotation cosines (every s-th paired token; 0 = all, exact, about "
                        "one more GEMM per token). cosine before and the fit residuals always use every token")
    p.add_argument("--full-moments", action="store_true",
                   help="also keep the full Sx = Σxᵀx and Sy = Σyᵀy in <output-dir>/stats/ (PCA always does; plain "
                        "Procrustes needs only their traces; costs about one more GEMM per token)")
    p.add_argument("--solve-permutations", action="store_true",
                   help="also solve MLP-neuron and GQA head permutations (needs the down_proj / o_proj inputs)")
    p.add_argument("--model-config", default=None,
                   help="config.json or model folder giving heads / kv heads / head_dim (default: the student "
                        "capture's model folder)")
    p.add_argument("--spec-out", default=None, metavar="transforms.json",
                   help="write the fold's transforms.json here (pooled Q as residual_rotation_path, permutations per layer)")
    p.add_argument("--workers", type=int, default=2,
                   help="layers solved at once on threads, without --dask-* (each holds its own O(d²) moments; with "
                        "--solve-permutations also O(intermediate_size²) neuron correlations)")
    p.add_argument("--run-id", default=None, help="id recorded in every ledger row (default: rotate-<time>-<random>)")
    add_fanout_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.store.runs import new_run_id
    from lib.transport.options import RotateOptions
    from lib.transport.plan import plan_rotation

    options = RotateOptions(pca_dim=args.pca_dim, exclude_position0=args.exclude_position0,
                            layer_weights=tuple(args.layer_weight or ()), pool_scale=args.pool_scale,
                            cosine_tokens=args.cosine_tokens, solve_permutations=args.solve_permutations,
                            model_config=args.model_config, full_moments=args.full_moments)
    run_id = args.run_id or new_run_id("rotate")
    fanout = fanout_from_args(args)  # a bad or unreachable --dask-address fails here, before Prefect starts
    # Fail fast on bad input (indexes, layers, widths, --pca-dim, weights) before Prefect starts;
    # the flow then checks the checksums and the token ids before anything is written.
    plan_rotation(args.student_index, args.teacher_index, args.layer, args.output_dir, ledger=args.ledger,
                  spec_out=args.spec_out, options=options, run_id=run_id, check_tokens=False)
    if args.workers < 1:
        from lib.core.errors import BadInputError

        raise BadInputError(f"--workers must be >= 1, got {args.workers}")
    from flows.console import load_flow
    from flows.runners import on_runner

    rotate_flow = load_flow("rotate")

    flow = on_runner(rotate_flow, fanout, threads=args.workers)
    summary = flow(student_index=args.student_index, teacher_index=args.teacher_index, layers=args.layer,
                          output_dir=args.output_dir, ledger=args.ledger, spec_out=args.spec_out,
                          options=options, run_id=run_id)
    print(summary["table"])
    if summary["ledger"]:
        print(f"ledger: {len(summary['layers'])} row(s) appended to {args.ledger} (run {summary['run_id']})")
    if summary["spec"]:
        print(f"transforms spec: {summary['spec']}")
    return 0
