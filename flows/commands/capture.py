"""`tourguide capture`: activations of a HF causal LM over the tour-stop corpus → shards."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture", help="capture residual-stream activations (+ token ids, logits) into checksummed shards",
        description="Capture activations of a HF causal LM over texts into one safetensors shard per sample plus "
                    "a metadata.jsonl index. Re-running with the same inputs is served from the Prefect cache; "
                    "missing or corrupt shards are recomputed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF hub id (must already be in the HF cache: this tool runs offline) or a local model folder; "
                        "default: the built-in demo teacher (built once, cached)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype stored in the shards")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the forward pass (default: --dtype). On CPU use float32 with --dtype bfloat16: bf16 compute is ~10x slower there")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda when available)")
    p.add_argument("--output-dir", default="activations", help="folder for the shards and metadata.jsonl (created if missing)")
    p.add_argument("--layer", action="append", default=None, metavar="MODULE",
                   help="hook point, repeatable: a module name such as model.layers.3 (its output; for a decoder block "
                        "the residual after it) or MODULE:input (its input, e.g. model.layers.3.mlp.down_proj:input). "
                        "Default: every decoder block")
    p.add_argument("--max-length", type=int, default=None, help="truncate each text to this many tokens (recorded per sample)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (right-padded)")
    p.add_argument("--logits", action=argparse.BooleanOptionalAction, default=True,
                   help="store logits [T, V]; --no-logits skips lm_head entirely")
    p.add_argument("--backend", default="torch", choices=["torch", "vllm"], help="vllm needs the `vllm` extra (GPU hosts)")
    p.add_argument("--text", action="append", default=None, help="a text to capture (repeatable)")
    p.add_argument("--text-file", action="append", default=None, help="newline-delimited UTF-8 file, one text per line (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="capture only the first N texts")
    p.add_argument("--hf-home", default=None, help="HF_HOME to look in for hub models (its hub/ cache)")
    p.add_argument("--hf-hub-cache", default=None, help="HF hub cache folder to look in (overrides --hf-home)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    p.add_argument("--partitions", type=int, default=1,
                   help="split the batches into N partitions (balanced by tokens), each a child run; from a "
                        "deployment they run concurrently as `capture/gpu` runs, here one after another")
    p.add_argument("--analyze", action="store_true", help="print the per-layer mean / max |activation| table afterwards")
    v = p.add_argument_group("vLLM backend")
    v.add_argument("--vllm-tensor-parallel-size", type=int, default=1)
    v.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5)
    v.add_argument("--vllm-max-model-len", type=int, default=None)
    v.add_argument("--vllm-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="eager mode; hooks need it (CUDA graphs would skip them), so --no-vllm-eager is refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.capture.plan import plan_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import load_texts
    from lib.store.staging import check_output_dir

    model = args.model
    if model is None:
        from lib.demo.teacher import ensure_demo_teacher

        model = str(ensure_demo_teacher())
    vllm_options = {"tensor_parallel_size": args.vllm_tensor_parallel_size,
                    "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
                    "max_model_len": args.vllm_max_model_len, "enforce_eager": args.vllm_eager}
    spec = CaptureSpec(model=model, revision=args.revision, dtype=args.dtype, compute_dtype=args.compute_dtype,
                       device=args.device, hook_points=tuple(args.layer or ()), max_length=args.max_length,
                       logits=args.logits, batch_size=args.batch_size, backend=args.backend, hf_home=args.hf_home,
                       hf_hub_cache=args.hf_hub_cache, trust_remote_code=args.trust_remote_code,
                       vllm_options=vllm_options)
    # Fail fast on bad input, before Prefect starts its (throwaway) API and before any write.
    check_output_dir(args.output_dir)
    if args.partitions < 1:
        from lib.core.errors import BadInputError

        raise BadInputError(f"--partitions {args.partitions}: must be >= 1 (1 = no partitions)")
    plan = plan_capture(spec, load_texts(args.text, args.text_file, limit=args.limit))
    if args.backend == "vllm":
        from lib.capture.vllm_support import require_vllm

        require_vllm(spec, plan.hook_points)
    from flows.console import load_flow

    capture_flow = load_flow("capture")

    manifest = capture_flow(model=model, output_dir=args.output_dir, texts=args.text, text_files=args.text_file,
                            layers=args.layer, dtype=args.dtype, compute_dtype=args.compute_dtype, device=args.device,
                            max_length=args.max_length, batch_size=args.batch_size, logits=args.logits,
                            backend=args.backend, revision=args.revision, hf_home=args.hf_home,
                            hf_hub_cache=args.hf_hub_cache, limit=args.limit, vllm_options=vllm_options,
                            trust_remote_code=args.trust_remote_code, progress=True, partitions=args.partitions)
    print(f"{manifest['n_samples']} sample(s): {manifest['n_computed']} computed, {manifest['n_reused']} reused "
          f"→ {manifest['index']}")
    if args.analyze:
        from lib.store.analysis import format_summary_table, summarize_activation_file

        print(format_summary_table(summarize_activation_file(args.output_dir)))
    return 0
