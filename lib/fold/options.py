"""`FoldOptions`: how a fold is written (dtype, shard size, overwrite, math device)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from lib.fold.checkpoint_io import DEFAULT_SHARD_BYTES

CHUNK_BYTES = 16 << 20  # float64 rows per chunk: bounds peak memory on huge tensors, still a fast GEMM


@dataclass(frozen=True)
class FoldOptions:
    """How to write the fold. The last three switches exist for negative controls in tests
    (each reproduces a known fold bug the equivalence gate must catch); the CLI never sets them."""

    dtype: str | None = None  # None: every tensor keeps its stored dtype
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    chunk_bytes: int = CHUNK_BYTES
    device: str = "cpu"  # where the float64 chunk math runs: cpu | cuda | auto (cuda when present)
    fold_gains: bool = True
    untie: bool = True
    permute_qkv_bias: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FoldOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
