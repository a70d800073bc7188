"""Where the GPU steps of a run go: this process, or the `gpu` work pool as deployment runs.

`use_deployments` is "auto" by default: on when the run itself was started from a deployment
(a worker runs it, so `prefect.runtime.deployment.id` is set, also inside its subflows), off when
it runs in-process (`tourguide demo`, `tourguide qa`, Python). true/false force it either way.
On, capture (the pipeline's and QA's) and fold run as `capture/gpu` and `fold/gpu`.
"""

from __future__ import annotations

from typing import Any, Literal

from lib.core.errors import TourGuideError

AUTO = "auto"
UseDeployments = bool | Literal["auto"]


def deployments_wanted(value: Any = AUTO) -> bool:
    """True/false as given; "auto" (or None): whether this run came from a deployment."""
    if value is None or value == AUTO:
        from prefect.runtime import deployment

        return deployment.id is not None
    if not isinstance(value, bool):
        raise TourGuideError(f"use_deployments {value!r}: give true, false or \"auto\"")
    return value


def run_child(deployment: str, parameters: dict[str, Any], key: str, redispatch: int = 0) -> Any:
    """Run a `gpu` deployment and wait; the idempotency key makes a retried parent reuse the
    child run instead of starting a second one. Raises naming the child and why it ended.

    `redispatch` > 0: a child that ends Crashed (its worker died; the zombie automation of
    deployments/setup_pools.sh marks it) is dispatched again, up to that many times, each attempt
    under its own key `<key>-a<attempt>` (the old key would return the crashed run)."""
    from prefect.deployments import run_deployment
    from prefect.logging import get_logger

    for attempt in range(1, redispatch + 2):
        run = run_deployment(deployment, parameters=parameters, timeout=None,
                             idempotency_key=f"{key}-a{attempt}" if redispatch else key)
        if not (run.state and run.state.is_crashed()) or attempt > redispatch:
            break
        get_logger("tourguide.placement").warning("deployment %s run %s crashed (%s): dispatching it again (attempt %d)",
                                                  deployment, run.name, run.state.message, attempt + 1)
    if not run.state or not run.state.is_completed():
        why = f": {run.state.message}" if run.state and run.state.message else ""
        raise TourGuideError(f"deployment {deployment} run {run.name} ({run.id}) ended "
                             f"{run.state.name if run.state else 'without a state'}{why}; "
                             f"logs: prefect flow-run logs {run.id}")
    return run


def run_children(flow_fn: Any, deployment: str, parameters: dict[str, Any], partitions: list[int], remote: bool,
                 redispatch: int = 2) -> None:
    """Run `flow_fn(**parameters, partition=i)` for each i and wait for all: with `remote`, as
    concurrent runs of `deployment` (key `<this run>-p<i>-a<attempt>`, crashed ones dispatched
    again), else in-process one after another. Raises naming every partition that failed."""
    if not remote:
        for i in partitions:
            flow_fn(**{**parameters, "partition": i})
        return
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from prefect.runtime import flow_run

    # A copied context per thread keeps each child linked to this run (so the server cancels it
    # with its parent) and lets run_deployment find the flow-run context.
    with ThreadPoolExecutor(max_workers=max(len(partitions), 1), thread_name_prefix="partition") as pool:
        futures = {i: pool.submit(contextvars.copy_context().run, run_child, deployment, {**parameters, "partition": i},
                                  f"{flow_run.id}-p{i}", redispatch) for i in partitions}
    errors = {i: f.exception() for i, f in futures.items() if f.exception() is not None}
    if errors:
        raise TourGuideError(f"{len(errors)} of {len(partitions)} partition(s) failed: "
                             + "; ".join(f"p{i}: {e}" for i, e in errors.items()))
