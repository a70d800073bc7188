"""Subprocess entry points for the reliability tests (so that a test can SIGKILL real work, or run
two writers at once). Not collected by pytest. Run: `python -m tests.reliability.workers CMD …`

    capture   --model DIR --out DIR --limit N [--batch-size B]    lib.capture.run.run_capture over samples/*
    ledger    --path P --writer W --appends N --rows R            lib.store.ledgers.append_rows, N appends
    fold      --model DIR --out DIR --spec transforms.json        lib.fold.checkpoint.fold_from_spec
    catalogue --cases cases.json --results results.json           the bad-input table through flows.cli.main
    zygote                                                        imports torch once, then forks one child
                                                                  per JSON job read from stdin (see below)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

from tests.reliability.barrier_site.sitecustomize import wait_barrier


def capture(args: argparse.Namespace) -> None:
    from lib.capture.run import run_capture
    from lib.capture.spec import CaptureSpec
    from lib.store.corpus import load_texts

    import time

    import lib.capture.run as run

    spec = CaptureSpec(model=args.model, batch_size=args.batch_size)
    commit = run.commit_shards
    commits: list[float] = []

    def timed_commit(*a, **kw):
        if not commits:
            if args.barrier:
                wait_barrier(Path(args.barrier), args.parties, timeout=120)  # every writer holds its first batch: now all at once
            commits.append(time.time())  # [0]: when this writer started committing
        out = commit(*a, **kw)
        commits.append(time.time())
        return out

    run.commit_shards = timed_commit  # this worker process only: when each batch was committed
    manifest = run_capture(spec, load_texts(limit=args.limit), args.out)
    print(json.dumps({**manifest, "commit_times": commits}), flush=True)


def ledger(args: argparse.Namespace) -> None:
    from lib.store.ledgers import append_rows

    for i in range(args.appends):
        rows = [{"run_id": args.writer, "index": str(i), "shard": f"{args.writer}-{i}-{j}", "sample_id": f"s{j}",
                 "sha256": "0" * 64, "bytes": j, "ok": True, "checked_at": "now"} for j in range(args.rows)]
        append_rows(args.path, "shards", rows)


def fold(args: argparse.Namespace) -> None:
    from lib.fold.checkpoint import fold_from_spec
    from lib.fold.options import FoldOptions

    res = fold_from_spec(args.model, args.out, args.spec, FoldOptions(max_shard_bytes=args.max_shard_bytes))
    print(json.dumps({"shards": len(res.shards)}), flush=True)


def _tree(roots: list[str]) -> dict[str, list[int]]:
    out = {}
    for root in map(Path, roots):
        if root.exists():
            for p in [root, *root.rglob("*")]:
                st = p.lstat()
                out[str(p)] = [st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_ino]
    return out


def catalogue(args: argparse.Namespace) -> None:
    """Run each case's argv through the real CLI entry point in this one process and record the
    exit code, the exception class behind it (SystemExit.__context__), stderr, what changed on
    disk, and whether Prefect was imported (bad input must fail before Prefect is touched)."""
    from flows.cli import main

    cases = json.loads(Path(args.cases).read_text())
    results = {}
    for case in cases:
        before = _tree(case["watch"])
        err, out = io.StringIO(), io.StringIO()
        code, cls = None, None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(case["argv"])
            except SystemExit as exc:
                code = exc.code
                ctx = exc.__context__
                cls = type(ctx).__name__ if ctx is not None else None
            except BaseException as exc:  # noqa: BLE001 - a crash is a finding, report it
                code, cls = "crash", type(exc).__name__
                err.write(repr(exc))
        after = _tree(case["watch"])
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        results[case["id"]] = {"code": code, "cls": cls, "stderr": err.getvalue(), "stdout": out.getvalue(),
                               "changed": changed, "prefect_imported": "prefect" in sys.modules}
    Path(args.results).write_text(json.dumps(results, indent=1))


def zygote(args: argparse.Namespace) -> None:
    """A warm interpreter: import torch/transformers/lib once (≈3 s of CPU on two cores), then for
    each stdin line {"argv": [...], "result": path, "log": path} fork a child that runs
    `main(argv)` with stdout to `result` and stderr to `log`, and print "pid N". The next stdin
    line is "kill" (SIGKILL the child, by its pid) or "wait"; then reap it and print
    "exit N STATUS" (STATUS = -signal when killed). A child that ends first stays a zombie until
    then, so its pid is never reused before the kill. The parent never runs torch ops, so forking
    is safe (no OpenMP pool exists yet)."""
    import os

    import lib.fold.transform_set  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import lib.capture.run  # noqa: F401
    import lib.fold.checkpoint  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: run the job, never return into the loop
            code = 1
            try:
                out = os.open(job["result"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(log, 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                main(job["argv"])
                code = 0
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        if sys.stdin.readline().strip() == "kill":
            os.kill(pid, 9)  # SIGKILL; a zombie ignores it
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="workers")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--limit", type=int, required=True)
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--barrier", default=None, help="folder: wait for --parties workers before the first commit")
    c.add_argument("--parties", type=int, default=2)
    c.set_defaults(func=capture)
    g = sub.add_parser("ledger")
    g.add_argument("--path", required=True)
    g.add_argument("--writer", required=True)
    g.add_argument("--appends", type=int, default=20)
    g.add_argument("--rows", type=int, default=5)
    g.set_defaults(func=ledger)
    f = sub.add_parser("fold")
    f.add_argument("--model", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--spec", required=True)
    f.add_argument("--max-shard-bytes", type=int, default=200_000)
    f.set_defaults(func=fold)
    k = sub.add_parser("catalogue")
    k.add_argument("--cases", required=True)
    k.add_argument("--results", required=True)
    k.set_defaults(func=catalogue)
    z = sub.add_parser("zygote")
    z.set_defaults(func=zygote)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
