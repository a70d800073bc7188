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


def run_child(deployment: str, parameters: dict[str, Any], key: str) -> Any:
    """Run a `gpu` deployment and wait; the idempotency key makes a retried parent reuse the
    child run instead of starting a second one. Raises naming the child and why it ended."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, idempotency_key=key, timeout=None)
    if not run.state or not run.state.is_completed():
        why = f": {run.state.message}" if run.state and run.state.message else ""
        raise TourGuideError(f"deployment {deployment} run {run.name} ({run.id}) ended "
                             f"{run.state.name if run.state else 'without a state'}{why}; "
                             f"logs: prefect flow-run logs {run.id}")
    return run
