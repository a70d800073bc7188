"""Shared task policy: retry only transient failures, readable names, quiet result storage."""

from __future__ import annotations

from typing import Any

from lib.core.errors import is_transient


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for every task: retry I/O hiccups and CUDA OOM, never bad input,
    checksum mismatches or a failed equivalence gate."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


RETRY = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_transient)
