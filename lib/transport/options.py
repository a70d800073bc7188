"""`RotateOptions`: how `tourguide rotate` solves (PCA, position 0, layer weights, pooling
scale, cosine sampling, permutations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from lib.core.errors import BadInputError

DEFAULT_COSINE_TOKENS = 16384


POOL_SCALES = ("raw", "normalized")


@dataclass(frozen=True)
class RotateOptions:
    """How to solve. full_moments: also accumulate the full Sx = Σxᵀx, Sy = Σyᵀy into stats/
    (PCA always does; plain Procrustes needs only their traces). layer_weights: (layer, w) pairs for the pooled rotation (others 1.0);
    pool_scale 'raw' pools Σ w_l C_l as written (layers with larger residuals weigh more),
    'normalized' divides each C_l by sqrt(tr Sx_l tr Sy_l) first. cosine_tokens: cap on the
    tokens behind the after-rotation cosines (0 = all). model_config: config.json (or model
    folder) giving heads / kv heads / head_dim for --solve-permutations (default: the student
    capture's model folder)."""

    pca_dim: int | None = None
    exclude_position0: bool = False
    layer_weights: tuple[tuple[str, float], ...] = ()
    pool_scale: str = "raw"
    cosine_tokens: int = DEFAULT_COSINE_TOKENS
    solve_permutations: bool = False
    model_config: str | None = None
    chunk_rows: int | None = None
    full_moments: bool = False  # keep Sx, Sy in stats/ even without PCA (~one more GEMM per token)

    def check(self) -> None:
        if self.pca_dim is not None and self.pca_dim < 1:
            raise BadInputError(f"--pca-dim must be >= 1, got {self.pca_dim}")
        if self.pool_scale not in POOL_SCALES:
            raise BadInputError(f"--pool-scale {self.pool_scale!r} is not one of {list(POOL_SCALES)}")
        if self.cosine_tokens < 0:
            raise BadInputError(f"--cosine-tokens must be >= 0 (0 = every token), got {self.cosine_tokens}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise BadInputError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        for layer, w in self.layer_weights:
            if not math.isfinite(w) or w < 0:
                raise BadInputError(f"--layer-weight {layer}={w}: weights must be finite and >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_weights"] = [list(p) for p in self.layer_weights]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RotateOptions:
        d = dict(d or {})
        d["layer_weights"] = tuple((str(k), float(v)) for k, v in d.get("layer_weights", ()))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})
