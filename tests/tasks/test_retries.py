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
