"""`FoldOptions`: how a fold is written (dtype, shard size, overwrite, math device).

Known fold bugs (no gain fold, a kept tie, unpermuted q/k/v biases) are not options: the
negative-control tests inject them with monkeypatch (tests/fold_bugs.py), so no deployment
parameter can switch them on.
"""

from __future__ import annotations

from pydantic import Field

from lib.core.dtypes import DTYPES
from lib.core.options import Options, one_of
from lib.fold.checkpoint_io import DEFAULT_SHARD_BYTES

CHUNK_BYTES = 16 << 20  # float64 rows per chunk: bounds peak memory on huge tensors, still a fast GEMM


class FoldOptions(Options):
    """How to write the fold (`tourguide fold` flags; the fold flow's `options` parameter)."""

    label = "fold options"

    dtype: one_of(DTYPES) | None = Field(None, description="cast floating tensors of the output to this dtype "
                                                          "(default: every tensor keeps its stored dtype)")
    max_shard_bytes: int = Field(DEFAULT_SHARD_BYTES, ge=1, description="largest output shard, in bytes")
    overwrite: bool = Field(False, description="replace a non-empty output folder")
    chunk_bytes: int = Field(CHUNK_BYTES, ge=1, description="float64 bytes per chunk of the fold math (peak memory)")
    device: str = Field("cpu", description="where the float64 fold math runs: cpu | cuda | auto (cuda when present)")
