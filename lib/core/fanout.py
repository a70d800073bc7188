"""Where per-layer transport solves and per-variant QA metrics run: threads in this process (the
default), an existing Dask cluster (`dask_address`), or a Dask `LocalCluster` of N worker
processes started for the run (`dask_workers`). The flows pick the Prefect task runner from
this (flows/runners.py); here only the choice is checked, with no Prefect or Dask import, so a
bad address is refused before Prefect starts.

The choice never changes a number: each fanned-out task is one lib call that reads its shards
from disk (paths in, a small manifest out) and the flows combine results in layer / variant
order, whatever order they finish in.
"""

from __future__ import annotations

import socket
from typing import Annotated

from pydantic import Field, model_validator

from lib.core.errors import BadInputError
from lib.core.options import Options

# Dask's own comm schemes that reach another process over TCP (the only ones we can pre-check).
DASK_SCHEMES = ("tcp", "tls")
DEFAULT_DASK_PORT = 8786
CONNECT_TIMEOUT_S = 5.0

DaskAddress = Annotated[str | None, Field(
    description="run per-layer solves and per-variant QA metrics on this Dask scheduler "
                      "(tcp://host:8786; its workers must see the run folder and import this project)")]
DaskWorkers = Annotated[int | None, Field(
    ge=1, description="run per-layer solves and per-variant QA metrics on a Dask LocalCluster of N worker "
                            "processes started for this run (one thread each)")]


class FanOut(Options):
    """`--dask-address` / `--dask-workers` of `tourguide rotate` and `tourguide qa` (and the
    pipeline config's fields of the same names). Neither: threads in this process."""

    label = "fan-out"

    dask_address: DaskAddress = None
    dask_workers: DaskWorkers = None

    @model_validator(mode="after")
    def _one_of(self) -> FanOut:
        check_fanout(self.dask_address, self.dask_workers)
        return self

    @property
    def on_dask(self) -> bool:
        return self.dask_address is not None or self.dask_workers is not None


def check_fanout(dask_address: str | None, dask_workers: int | None) -> None:
    """Both set → refuse (which cluster did the user mean?); a malformed address → refuse."""
    if dask_address is not None and dask_workers is not None:
        raise ValueError(f"dask_address ({dask_address!r}) and dask_workers ({dask_workers}) were both given: "
                         "use the cluster at dask_address, or start a LocalCluster of dask_workers processes — "
                         "drop one of the two")
    if dask_address is not None:
        parse_dask_address(dask_address)


def parse_dask_address(address: str) -> tuple[str, str, int]:
    """'tcp://host:8786' / 'host:8786' / 'host' → (scheme, host, port); ValueError naming the
    address, what is wrong and the fix."""
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    fix = "write it as tcp://HOST:PORT (the address `dask scheduler` prints, e.g. tcp://10.0.0.5:8786)"
    if scheme not in DASK_SCHEMES:
        raise ValueError(f"dask address {address!r}: scheme {scheme!r} is not one of {list(DASK_SCHEMES)}; {fix}")
    host, colon, port_text = rest.rstrip("/").rpartition(":")
    if not colon:
        host, port_text = rest.rstrip("/"), str(DEFAULT_DASK_PORT)
    host = host.strip("[]")  # [::1]:8786
    if not host or "/" in host or " " in host:
        raise ValueError(f"dask address {address!r}: no host name in it; {fix}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"dask address {address!r}: port {port_text!r} is not a number in 1..65535; {fix}")
    return scheme, host, int(port_text)


def check_dask_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the scheduler: BadInputError naming the address, the
    reason and the fix when nothing listens there. Cheap, and it runs before Prefect starts."""
    try:
        _, host, port = parse_dask_address(address)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise BadInputError(
            f"dask address {address!r}: cannot connect to {host}:{port} ({reason}). Start the scheduler there "
            f"(`dask scheduler --host {host} --port {port}` and `dask worker {address}` from the project folder), "
            "fix the address, or leave --dask-address out (threads in this process; --dask-workers N starts a "
            "local cluster)") from None
