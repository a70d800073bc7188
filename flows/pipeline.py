"""The pipeline flow: scaffold → capture student + teacher → validate → transports (+ permutations)
→ transforms.json → fold → equivalence gate → QA over {baseline, rotated, folded} → report.

Run it: `tourguide demo` (a planted student), or from Python:
    pipeline_flow(PipelineConfig(teacher="…", student="…", run_id="x"))
In-process every step runs in this process. With `use_deployments` ("auto": when this run came
from a deployment, flows.placement), capture (QA's too) and fold run as the `gpu` deployments
(`capture/gpu`, `fold/gpu`) through `run_deployment`; results travel as files and ledgers, and
each child gets an idempotency key so a retried parent starts no duplicates. With `partitions` > 1
each capture is planned here and its partitions run as concurrent `capture/gpu` children.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.hooks import cancel_children, log_failure
from flows.capture import capture_flow
from flows.fold import fold_flow
from flows.placement import deployments_wanted, run_child
from flows.qa import qa_flow
from flows.rotate import rotate_flow
from flows.runners import on_runner
from flows.scaffold import scaffold_flow
from lib.fold.checkpoint import read_report
from lib.pipeline.config import PipelineConfig
from lib.pipeline.steps import FOLDED_NAME
from lib.store.corpus import SAMPLES_DIR, sample_files
from tasks.names import artifact_key
from tasks.pipeline import claim_run_task, eval_config_task, fold_inputs_task, mark_fold_task, plan_pipeline_task
from tasks.rotate import rotation_markdown


def _run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters.get("config")
    run_id = cfg.get("run_id") if isinstance(cfg, dict) else getattr(cfg, "run_id", None)
    return f"pipeline-{run_id or 'run'}"


# validate_parameters=False: `config` is validated by PipelineConfig.parse below, whose errors are
# BadInputErrors naming the key ("pipeline_flow config: teacherr: unknown key …"); Prefect's own
# check would raise a ParameterTypeError instead. The UI still renders the model as a form.
@flow(name="pipeline", flow_run_name=_run_name, log_prints=False, validate_parameters=False,
      on_failure=[log_failure], on_cancellation=[cancel_children])
def pipeline_flow(config: PipelineConfig) -> dict[str, Any]:
    """Run the whole pipeline for `config`; returns the paths and summaries of every step."""
    from prefect.runtime import flow_run

    config = PipelineConfig.parse(config, "pipeline_flow config")
    claim_run_task(config, label=config.run_id)  # one run id, one config (runs/<id>/pipeline.json)
    log = get_run_logger()
    on_gpu_pool = deployments_wanted(config.use_deployments)
    run_dir = config.run_dir()
    scaffold = scaffold_flow(run_id=config.run_id, runs_root=config.runs_root)
    plan = plan_pipeline_task(config, label=config.run_id)
    acts = run_dir / "activations"
    texts = [str(f) for f in sample_files(SAMPLES_DIR)]
    capture_kw = dict(text_files=texts, layers=plan["hooks"], dtype=config.dtype, device=config.device,
                      max_length=config.max_length, batch_size=config.batch_size, limit=config.limit,
                      compute_dtype=config.compute_dtype, hf_home=config.hf_home, hf_hub_cache=config.hf_hub_cache,
                      logits=False)  # the transports read activations only; QA captures its own logits
    indexes = {}
    for side, model in (("student", config.student), ("teacher", config.teacher)):
        out = str(acts / f"transport-{side}")
        if on_gpu_pool and config.partitions == 1:
            run_child("capture/gpu", {"model": model, "output_dir": out, **capture_kw},
                      key=f"{flow_run.id}-capture-{side}")
            indexes[side] = str(Path(out) / "metadata.jsonl")
        else:  # partitioned: plan here (cpu), the partitions go to the gpu pool
            indexes[side] = capture_flow(model=model, output_dir=out, partitions=config.partitions,
                                         use_deployments=on_gpu_pool, **capture_kw)["index"]
    rotations = run_dir / "rotations"
    spec = run_dir / "transforms.json"
    options = {"solve_permutations": config.permutations, "exclude_position0": config.exclude_position0,
               "pca_dim": config.pca_dim, "model_config": plan["student_dir"] or config.student}
    # per-layer solves (and below, per-variant QA metrics) on threads or Dask: flows.runners
    rot = on_runner(rotate_flow, config.fanout)(
        student_index=indexes["student"], teacher_index=indexes["teacher"], layers=plan["blocks"],
        output_dir=str(rotations), ledger=str(run_dir / "ledgers" / "rotations"), spec_out=str(spec), options=options,
        run_id=f"{config.run_id}-rotate")
    folded = str(run_dir / "checkpoints" / FOLDED_NAME)
    gate: dict[str, Any] | None = None
    if config.pca_dim is None:
        inputs = fold_inputs_task(str(spec), config.student, folded, label=config.run_id, hf_home=config.hf_home,
                                  hf_hub_cache=config.hf_hub_cache)
        if inputs["current"]:
            log.info("fold output %s is current (same spec, files and source): reused", folded)
            gate = read_report(folded).get("gate")
        else:
            params = {"checkpoint": config.student, "output_dir": folded, "spec": str(spec),
                      "options": {"overwrite": True}, "label": f"{config.run_id}-student", "hf_home": config.hf_home,
                      "hf_hub_cache": config.hf_hub_cache}
            if on_gpu_pool:
                run_child("fold/gpu", params, key=f"{flow_run.id}-fold")
                gate = read_report(folded).get("gate")
            else:
                gate = fold_flow(**params)["gate"]
            mark_fold_task(folded, inputs["digest"], label=config.run_id)
    eval_path = eval_config_task(config, rot["global"].get("rotation_path"), folded if gate else None, label=config.run_id)
    qa = on_runner(qa_flow, config.fanout)(config=eval_path, use_deployments=on_gpu_pool)
    summary = {"run_id": config.run_id, "run_dir": str(run_dir), "scaffold": scaffold, "indexes": indexes,
               "rotate": {k: rot[k] for k in ("layers", "global", "spec", "table", "n_tokens", "n_samples")},
               "gate": gate, "eval_config": eval_path, "qa": qa,
               "report": (qa.get("report") or {}).get("report_path")}
    create_markdown_artifact(key=artifact_key("pipeline", config.run_id),
                             markdown=f"# Pipeline {config.run_id}\n\nGate: `{(gate or {}).get('status')}`  \n"
                                      f"Report: `{summary['report']}`\n\n" + "#" + rotation_markdown(rot),
                             description=f"pipeline summary for run {config.run_id}")
    return summary
