"""Shared task policy: retry only transient failures, readable names, quiet result storage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from lib.core.errors import is_transient

GPU_LIMIT = "gpu"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for every task: retry I/O hiccups and CUDA OOM, never bad input,
    checksum mismatches or a failed equivalence gate."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


RETRY = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_transient)


@lru_cache(maxsize=1)
def _gpu_limit_exists() -> bool:
    """Whether the server has the `gpu` global concurrency limit (deployments/setup_pools.sh makes
    it with one slot per GPU). Asked once per process: a worker starts a process per flow run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        return False
    return True


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one slot of the `gpu` limit around a GPU section (a capture batch, a fold), so that no
    more sections run at once than the host has GPUs, whichever runs and workers they come from.
    Without the limit (an ephemeral API, a server not set up) nothing is held. A 60 s lease, renewed
    while held: a SIGKILLed holder's slot comes back within a minute instead of leaking."""
    if not _gpu_limit_exists():
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, lease_duration=60):
        yield
