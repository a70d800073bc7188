"""Retry policy by fault injection: transient failures are retried, bad input is not."""

from __future__ import annotations

import errno

import pytest
from prefect import flow, task

from lib.core.errors import BadInputError, ChecksumError, TransientError, is_transient
from tasks.common import RETRY


def test_transient_classification():
    assert is_transient(TransientError("disk hiccup"))
    assert is_transient(OSError(errno.EIO, "I/O error"))
    assert is_transient(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_transient(BadInputError("--max-length must be >= 1"))
    assert not is_transient(ChecksumError("sha256 mismatch"))
    assert not is_transient(FileNotFoundError("nope"))
    assert not is_transient(ValueError("plain bug"))


def test_a_transient_failure_is_retried_and_bad_input_is_not(prefect_harness):
    attempts = {"flaky": 0, "bad": 0}

    @task(**{**RETRY, "retry_delay_seconds": 0})
    def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise TransientError("injected: the NFS mount blinked")
        return "ok"

    @task(**{**RETRY, "retry_delay_seconds": 0})
    def bad() -> None:
        attempts["bad"] += 1
        raise BadInputError("injected: --layer model.layers.99 is not a module")

    @flow
    def run_flaky() -> str:
        return flaky()

    @flow
    def run_bad() -> None:
        bad()

    assert run_flaky() == "ok" and attempts["flaky"] == 2
    with pytest.raises(BadInputError, match="model.layers.99"):
        run_bad()
    assert attempts["bad"] == 1, "bad input was retried"


def test_a_retried_rotate_record_appends_its_ledger_rows_once(prefect_harness, tmp_path, monkeypatch):
    """The record task appends the ledger rows, then writes the spec and the table; a transient
    failure after the append makes Prefect retry the task, which must not add the rows again."""
    import numpy as np

    import lib.transport.record as record
    from lib.store.ledgers import read_ledger
    from lib.testing.synthetic import SyntheticSample, write_capture_from_arrays
    from lib.transport.plan import plan_rotation
    from lib.transport.pool import pool_rotation
    from lib.transport.solve import solve_layer
    from tasks.rotate import record_rotation_task

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    xs = [rng.standard_normal((12, 8)) for _ in range(3)]
    student = write_capture_from_arrays(tmp_path / "s", [SyntheticSample(f"t{i}", np.arange(12), {"model.layers.0": x})
                                                         for i, x in enumerate(xs)])
    teacher = write_capture_from_arrays(tmp_path / "t", [SyntheticSample(f"t{i}", np.arange(12), {"model.layers.0": x @ q})
                                                         for i, x in enumerate(xs)])
    ledger = tmp_path / "ledgers" / "rotations"
    plan = plan_rotation(student, teacher, None, tmp_path / "rot", ledger=ledger, run_id="retry-test")
    results = [solve_layer(plan, layer) for layer in plan.layers]
    pooled = pool_rotation(plan, results)
    table = record.format_rotation_table
    calls = {"n": 0}

    def flaky_table(merged):
        calls["n"] += 1
        if calls["n"] == 1:
            raise TransientError("injected after the ledger append: the worker lost its connection")
        return table(merged)

    monkeypatch.setattr(record, "format_rotation_table", flaky_table)

    @flow
    def record_once() -> dict:
        return record_rotation_task.with_options(retry_delay_seconds=0)(plan.model_dump(mode="json"), results, pooled)

    summary = record_once()
    assert calls["n"] == 2, "the transient failure was not retried"
    assert summary["ledger"] and len(read_ledger(ledger, "rotations")) == len(plan.layers)
