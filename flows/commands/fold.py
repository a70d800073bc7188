"""`tourguide fold`: fold a transforms.json into a checkpoint and gate it in fp32.

    tourguide fold --checkpoint Qwen/Qwen2.5-7B-Instruct --output-dir runs/x/checkpoints/rotated \\
                   --spec runs/x/transforms.json

Bad input (spec, paths, flags, checkpoint) fails in about a second without starting Prefect and
writes nothing; the fold itself runs as the `fold` Prefect flow.
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Fold the transforms of a transforms.json (one global residual rotation, GQA head permutations,
MLP neuron permutations, per-kv-head V/O rotations) into a safetensors checkpoint so that stock
loaders (transformers, vLLM) read the rotated model, then prove the fold exact: the output is
reloaded with AutoModelForCausalLM and compared with the source in float32 on a probe batch
(max|Δlogit|, mean KL, top-1 agreement, hidden-state cosine in the common basis h·Qᵀ).

Norm gains are folded into the linears that read them (float64, cast once), tied embeddings are
untied when a rotation needs it (tie_word_embeddings: false). The source is streamed tensor by
tensor; the output (sharded safetensors + index, config.json, generation_config.json, tokenizer
files byte for byte, fold_report.json) appears only complete. A failing gate exits 2 and marks
the output failed (FOLD_FAILED, fold_report.json)."""

EPILOG = """\
Transforms that are not exact (per-layer rotations that differ, rotations inside q/k heads,
query heads moved across kv groups) are refused; --allow-inexact folds them anyway and the gate
reports the drift instead of passing. Exit codes: 0 folded (and passed, or inexact by request),
2 bad input or failed gate."""


def register(subparsers) -> None:
    p = subparsers.add_parser("fold", help="fold rotations/permutations into a checkpoint and gate it in fp32",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="ID|DIR",
                   help="source checkpoint: a local HF folder (safetensors, sharded or not) or a hub id already in "
                        "the HF cache (offline)")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where the folded checkpoint goes (e.g. runs/<id>/checkpoints/rotated); never the source")
    p.add_argument("--spec", required=True, metavar="transforms.json",
                   help="the transforms spec (written by `tourguide rotate`, or by hand); its paths are relative "
                        "to its folder")
    p.add_argument("--allow-inexact", action="store_true",
                   help="fold transforms that do not preserve the function exactly; the gate reports the drift")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let spec paths point outside the run directory that holds the spec")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast floating tensors of the output to this dtype (default: keep each tensor's dtype; "
                        "the math is float64 either way, cast once)")
    p.add_argument("--fold-device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where the float64 fold math runs (default: %(default)s; the rotation is compute bound on "
                        "CPUs: 2·params·d flops)")
    p.add_argument("--max-shard-size", default="2GiB", metavar="SIZE",
                   help="largest output shard, e.g. 2GiB or 500MB (default: %(default)s)")
    p.add_argument("--revision", default=None, help="hub revision of --checkpoint when it is a hub id")
    p.add_argument("--hf-home", default=None, help="HF home whose hub cache holds the checkpoint")
    p.add_argument("--hf-hub-cache", default=None, help="HF hub cache folder (overrides --hf-home)")
    g = p.add_argument_group("equivalence gate")
    g.add_argument("--probe-texts", type=int, default=8, metavar="N",
                   help="probe texts, spread over the corpus (default: %(default)s)")
    g.add_argument("--probe-max-length", type=int, default=64, metavar="T",
                   help="tokens per probe text (default: %(default)s)")
    g.add_argument("--probe-text-file", action="append", default=[], metavar="FILE",
                   help="take probe texts from this UTF-8 file (one per line) instead of samples/*.txt; repeatable")
    g.add_argument("--device", default="auto", help="device for the gate's forward passes (default: auto)")
    g.add_argument("--max-kl", type=float, default=None,
                   help="mean-KL limit (default: 1e-6 for float32 outputs, 1e-2 bfloat16, 1e-3 float16)")
    g.add_argument("--max-logit-diff", type=float, default=None,
                   help="max|Δlogit| limit (default: 1e-2 for float32 outputs, unchecked for half precision)")
    g.add_argument("--min-top1", type=float, default=None,
                   help="top-1 agreement limit (default: 0.99 float32, 0.9 bfloat16, 0.95 float16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.core.errors import BadInputError
    from lib.fold.checkpoint import prepare_fold
    from lib.fold.checkpoint_io import parse_size
    from lib.fold.gate import GateOptions
    from lib.fold.options import FoldOptions

    if args.probe_texts < 1 or args.probe_max_length < 1:
        raise BadInputError("--probe-texts and --probe-max-length must be >= 1")
    options = FoldOptions(dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                          device=args.fold_device)
    gate = GateOptions(n_texts=args.probe_texts, max_length=args.probe_max_length,
                       text_files=tuple(args.probe_text_file), device=args.device, max_mean_kl=args.max_kl,
                       max_abs_logit_diff=args.max_logit_diff, min_top1=args.min_top1)
    common = dict(allow_inexact=args.allow_inexact, allow_outside_paths=args.allow_outside_paths)
    # Every check before Prefect starts (~15 s without a server): bad input fails fast, writes nothing.
    prepare_fold(args.checkpoint, args.spec, args.output_dir, options, revision=args.revision,
                 hf_home=args.hf_home, hf_hub_cache=args.hf_hub_cache, **common)
    for f in args.probe_text_file:
        from lib.store.corpus import read_lines

        read_lines(f)

    from flows.console import load_flow


    fold_flow = load_flow("fold")

    out = fold_flow(checkpoint=args.checkpoint, output_dir=args.output_dir, spec=args.spec,
                    options=options, gate_options=gate, revision=args.revision,
                    hf_home=args.hf_home, hf_hub_cache=args.hf_hub_cache, **common)
    print(out["gate"]["markdown"])
    print(f"folded checkpoint: {out['fold']['output_dir']} ({out['gate']['status']})")
    return 0
