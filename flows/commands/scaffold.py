"""`tourguide scaffold`: hash the corpus and lay out runs/<run_id>/ (manifest, snapshot, ledgers)."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaffold", help="create a run folder over a hashed snapshot of the samples and prompt files",
        description="Hash every sample file (file sha256 and one sha256 per blurb/line) and every prompt/style file "
                    "into runs/<run-id>/dataset_snapshot.json; write manifest.json (run id, created time, project git "
                    "commit, tokenizer and commits given, snapshot digest), an empty rotations.jsonl, and the "
                    "ledgers/ checkpoints/ activations/ logs/ figures/ folders. Re-running with the same run id and "
                    "inputs changes nothing; the same id with different inputs is refused with a list of what "
                    "changed (exit 2, nothing written).")
    p.add_argument("--run-id", default=None, help="run folder name (letters, digits, . _ -); default: run-<UTC time>")
    p.add_argument("--runs-root", default="runs", help="folder holding the runs (default: runs)")
    p.add_argument("--samples-dir", default=None, help="folder of *.txt sample files, one blurb per line "
                                                       "(default: the project's samples/)")
    p.add_argument("--prompts-dir", default=None, help="folder of prompt/style *.md files, searched recursively "
                                                       "(default: the project's prompts/)")
    p.add_argument("--prompt", action="append", default=None, metavar="FILE",
                   help="prompt/style file to hash instead of every --prompts-dir/**/*.md (repeatable; relative "
                        "names are looked up in --prompts-dir first)")
    p.add_argument("--tokenizer-name", default=None, help="tokenizer recorded in the manifest (e.g. Qwen/Qwen3-0.6B)")
    p.add_argument("--tokenizer-version", default=None, help="tokenizer revision/version recorded in the manifest")
    p.add_argument("--teacher-commit", default=None, help="teacher checkpoint commit/revision recorded in the manifest")
    p.add_argument("--student-commit", default=None, help="student checkpoint commit/revision recorded in the manifest")
    p.add_argument("--flow", action="store_true",
                   help="run as a Prefect flow (the default when PREFECT_API_URL is set; otherwise it answers directly)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib.store.runs import ScaffoldSpec, new_run_id

    kw = dict(run_id=args.run_id or new_run_id(), runs_root=args.runs_root, prompts=tuple(args.prompt or ()),
              tokenizer_name=args.tokenizer_name, tokenizer_version=args.tokenizer_version,
              teacher_commit=args.teacher_commit, student_commit=args.student_commit)
    if args.samples_dir:
        kw["samples_dir"] = args.samples_dir
    if args.prompts_dir:
        kw["prompts_dir"] = args.prompts_dir
    spec = ScaffoldSpec(**kw)
    if args.flow or os.environ.get("PREFECT_API_URL"):
        from lib.store.runs import check_run_id
        from lib.store.snapshot import build_snapshot

        check_run_id(spec.run_id)  # fail fast, before Prefect starts
        build_snapshot(spec.samples_dir, spec.prompts_dir, spec.prompts)
        from flows.console import load_flow

        scaffold_flow = load_flow("scaffold")

        manifest = scaffold_flow(**spec.model_dump(mode="json"))
    else:
        from lib.store.runs import scaffold_run

        manifest = scaffold_run(spec)
    state = "created" if manifest["created"] else "already exists with the same inputs (nothing changed)"
    print(f"run {manifest['run_id']} {state}: {manifest['run_dir']}")
    print(f"  snapshot {manifest['snapshot_digest']}: {manifest['n_blurbs']} blurbs in {manifest['n_sample_files']} "
          f"sample file(s), {manifest['n_prompt_files']} prompt file(s); project commit {manifest['git_commit']}")
    return 0
