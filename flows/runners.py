"""The one place that turns the user's fan-out choice (lib.core.fanout.FanOut) into a Prefect task
runner: threads by default (ThreadPoolTaskRunner), or Dask through prefect-dask — an existing
scheduler (`dask_address`) or a LocalCluster of `dask_workers` processes started for the flow run
and closed with it. The rotate and QA flows (and the pipeline's calls of them) run as
`on_runner(flow, fanout)`; the flows themselves combine results in layer / variant order, so
the runner changes where the work runs, never a number.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import Flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from lib.core.fanout import FanOut


def task_runner(fanout: FanOut | None = None, threads: int | None = None) -> TaskRunner | None:
    """The runner for `fanout`; None: keep the flow's own (threads with its default width)."""
    fanout = fanout or FanOut()
    if fanout.on_dask:
        _quiet_dask()
    if fanout.dask_address is not None:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=fanout.dask_address)
    if fanout.dask_workers is not None:
        from prefect_dask import DaskTaskRunner

        # One thread per worker process: each task already streams a layer with BLAS, and the
        # workers are what the user asked to count. Loopback only, no dashboard (no open ports).
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": fanout.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "host": "127.0.0.1",
                                              "scheduler_kwargs": {"dashboard": False}})
    return ThreadPoolTaskRunner(max_workers=threads) if threads is not None else None


def _quiet_dask() -> None:
    """distributed logs every worker start and stop at INFO to the console; keep WARNING and up
    unless the user configured it (the env var also reaches LocalCluster's worker processes)."""
    if "DASK_LOGGING__DISTRIBUTED" not in os.environ:
        os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
        logging.getLogger("distributed").setLevel(logging.WARNING)


def on_runner(flow: Flow[..., Any], fanout: FanOut | None = None, threads: int | None = None) -> Flow[..., Any]:
    """`flow` with the task runner `fanout` picks (unchanged when it picks the default)."""
    runner = task_runner(fanout, threads)
    return flow if runner is None else flow.with_options(task_runner=runner)
