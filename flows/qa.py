"""The nightly QA flow: for every variant of the eval config — capture (cached) → validate →
metrics → metrics ledger — then the report flow.

Run it: `tourguide qa --config deployments/eval_template.json` (deployment `nightly` in
deployments/prefect.yaml runs it on a cron schedule). The teacher is captured first (its failure
stops the night); a failing variant is logged, listed in the summary artifact and the report, and
the flow ends Failed after the report — the other variants' rows are already in the ledger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.capture import capture_flow
from flows.hooks import cancel_children, log_failure
from flows.placement import AUTO, UseDeployments, deployments_wanted, run_child
from flows.report import report_flow
from lib.core.errors import TourGuideError
from lib.core.progress import stage
from tasks.names import qa_run_name
from tasks.qa import load_eval_config_task, prepare_qa_task, publish_qa_summary_task, record_metrics_task
from tasks.validate import validate_shards


# Each variant's metrics task in flight streams its own teacher/variant shards: bound the
# threads; `tourguide qa --dask-address/--dask-workers` replaces the runner (flows.runners).
DEFAULT_WORKERS = 2


@flow(name="qa", flow_run_name=qa_run_name, log_prints=False, on_failure=[log_failure],
      on_cancellation=[cancel_children], task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_WORKERS))
def qa_flow(config: str, night: str | None = None, report: bool = True, raise_on_failure: bool = True,
            use_deployments: UseDeployments = AUTO) -> dict[str, Any]:
    """QA every variant of the eval config at `config` against its teacher. The captures run
    in-process, or as `capture/gpu` deployment runs with `use_deployments` (flows.placement:
    "auto" = when this run came from a deployment, e.g. qa/nightly).

    Returns {"run_id", "night", "results": [per-model summaries], "failures": [{variant, error}],
    "report": the report flow's result or None}. With failures and `raise_on_failure`, raises
    after the report is written."""
    from prefect.runtime import flow_run

    log = get_run_logger()
    on_gpu_pool = deployments_wanted(use_deployments)
    cfg = load_eval_config_task(config)
    ctx = prepare_qa_task(cfg, night)
    # QA's own captures: never overwrite the pipeline's activations/<model> (other hook points, dtype)
    acts = Path(ctx["run_dir"]) / "activations" / "qa"
    capture_kw = dict(text_files=ctx["sample_files"], layers=list(cfg["layers"]) or None, dtype=cfg["dtype"],
                      compute_dtype=cfg["compute_dtype"], device=cfg["device"], max_length=cfg["max_length"],
                      batch_size=cfg["batch_size"], logits=ctx["logits"], hf_home=cfg["hf_home"],
                      hf_hub_cache=cfg["hf_hub_cache"], limit=cfg["limit"])
    metrics, layers = list(cfg["metrics"]), ctx["metric_layers"]
    teacher = cfg["teacher"]

    def capture(name: str, path: str, revision: str | None) -> dict[str, Any]:
        out = str(acts / name)
        if on_gpu_pool:
            run_child("capture/gpu", {"model": path, "revision": revision, "output_dir": out, **capture_kw},
                      key=f"{flow_run.id}-qa-{name}")
            return {"index": str(Path(out) / "metadata.jsonl")}
        return capture_flow(model=path, revision=revision, output_dir=out, **capture_kw)

    # The console stage counts models captured; their metrics may still be running on the runner.
    with stage(f"qa {cfg['run_id']}", total=1 + len(cfg["variants"]), unit="models") as bar:
        t_cap = capture(teacher["name"], teacher["path"], teacher["revision"])
        validate_shards([t_cap["index"]], label=teacher["name"])
        # Metrics fan out on the flow's task runner (threads, or Dask: flows.runners) while the next
        # variant captures; every task reads its shards from disk and appends its own ledger rows.
        # Results and failures are gathered in config order, whatever order the tasks finish in.
        teacher_job = record_metrics_task.submit(ctx, teacher["name"], t_cap["index"], None, metrics, None, layers)
        bar.advance()
        jobs: list[tuple[str, Any]] = []  # (variant, future or the exception of its capture)
        # Variants of one checkpoint (e.g. with and without a rotation) share one capture.
        captured: dict[tuple[str, str | None], Any] = {(teacher["path"], teacher["revision"]): t_cap}
        for v in cfg["variants"]:
            key = (v["path"], v["revision"])
            if key not in captured:
                try:
                    captured[key] = capture(v["name"], v["path"], v["revision"])
                    validate_shards([captured[key]["index"]], label=v["name"])
                except Exception as exc:
                    captured[key] = exc  # the other variants of this checkpoint fail the same way, without a rerun
            v_cap = captured[key]
            bar.advance()
            if isinstance(v_cap, Exception):
                jobs.append((v["name"], v_cap))
                continue
            transports = [[t["kind"], t["path"]] for t in v["transports"]]
            jobs.append((v["name"], record_metrics_task.submit(ctx, v["name"], t_cap["index"], v_cap["index"], metrics,
                                                               transports, layers)))
        results = [teacher_job.result()]  # the teacher's own rows: their failure stops the night
        failures: list[dict[str, str]] = []
        for name, job in jobs:
            try:
                if isinstance(job, Exception):
                    raise job
                results.append(job.result())
            except Exception as exc:  # one variant's failure must not cost the others their rows
                log.error("variant %s failed: %s: %s", name, type(exc).__name__, exc)
                failures.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
    publish_qa_summary_task(ctx, results, failures)
    rep = report_flow(run_id=cfg["run_id"], runs_root=cfg["runs_root"], failures=failures) if report else None
    if failures and raise_on_failure:
        names = ", ".join(f["variant"] for f in failures)
        raise TourGuideError(
            f"QA of run {cfg['run_id']} night {ctx['night']}: {len(failures)} of {len(cfg['variants'])} variant(s) "
            f"failed ({names}):\n" + "\n".join(f"  {f['variant']}: {f['error']}" for f in failures)
            + f"\nThe other variants' rows are in {Path(ctx['run_dir']) / 'ledgers' / 'metrics'}"
            + (f"; report: {rep['report_path']}" if rep else "") + ". Fix the failing variants and re-run the night.")
    return {"run_id": cfg["run_id"], "night": ctx["night"], "results": results, "failures": failures, "report": rep}
