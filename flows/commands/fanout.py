"""`--dask-address` / `--dask-workers`, shared by `tourguide rotate` and `tourguide qa` (the
pipeline gets the same keys from PipelineConfig). Derived from lib.core.fanout.FanOut, so the
flags, their help and their checks are the model's."""

from __future__ import annotations

import argparse

from lib.core.fanout import FanOut, check_dask_reachable
from lib.core.flags import add_model_flags, given_flags, model_flags, validate_layers


def add_fanout_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fan-out (default: threads in this process)")
    add_model_flags(group, FanOut)


def fanout_from_args(args: argparse.Namespace) -> FanOut:
    """The choice on the command line; refuses both flags at once, a malformed address, and an
    address where no scheduler listens (before Prefect starts)."""
    fanout = validate_layers(FanOut, [("command line", given_flags(args, model_flags(FanOut)))], model_flags(FanOut))
    if fanout.dask_address is not None:
        check_dask_reachable(fanout.dask_address)
    return fanout
