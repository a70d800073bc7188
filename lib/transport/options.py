"""`RotateOptions`: how `tourguide rotate` solves (PCA, position 0, layer weights, pooling
scale, cosine sampling, permutations).
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import ConfigDict, Field, Strict, field_validator

from lib.core.options import Options, PathStr, Seq, one_of

DEFAULT_COSINE_TOKENS = 16384


POOL_SCALES = ("raw", "normalized")


class RotateOptions(Options):
    """How to solve (`tourguide rotate` flags; the rotate flow's `options` parameter).

    full_moments: also accumulate the full Sx = Σxᵀx, Sy = Σyᵀy into stats/ (PCA always does;
    plain Procrustes needs only their traces). layer_weights: (layer, w) pairs for the pooled
    rotation (others 1.0); pool_scale 'raw' pools Σ w_l C_l as written (layers with larger
    residuals weigh more), 'normalized' divides each C_l by sqrt(tr Sx_l tr Sy_l) first.
    cosine_tokens: cap on the tokens behind the after-rotation cosines (0 = all). model_config:
    config.json (or model folder) giving heads / kv heads / head_dim for --solve-permutations
    (default: the student capture's model folder)."""

    model_config = ConfigDict(serialize_by_alias=True)
    label = "rotate options"

    pca_dim: int | None = Field(None, description="PCA both sides to K dims and solve in K-space (needed when the "
                                                  "hidden sizes differ)")
    exclude_position0: bool = Field(False, description="leave out position 0 of every sample (BOS / attention sink)")
    layer_weights: Seq[Annotated[tuple[str, float], Strict(False)]] = Field(
        (), description="[layer, weight] pairs for the pooled rotation (other layers weigh 1.0)")
    pool_scale: one_of(POOL_SCALES) = Field("raw", description="raw: pool Σ w_l C_l as is; normalized: divide each "
                                                               "C_l by sqrt(tr Sx_l · tr Sy_l) first")
    cosine_tokens: int = Field(DEFAULT_COSINE_TOKENS, description="tokens behind the after-rotation cosines "
                                                                  "(0 = every token)")
    solve_permutations: bool = Field(False, description="also solve MLP-neuron and GQA head permutations")
    # Written `model_config` (flag --model-config, JSON key, UI form); pydantic reserves that name.
    config_ref: PathStr | None = Field(None, alias="model_config",
                                       description="config.json or model folder giving heads / kv heads / head_dim "
                                                   "(default: the student capture's model folder)")
    chunk_rows: int | None = Field(None, ge=1, description="rows per streamed chunk (default: automatic)")
    full_moments: bool = Field(False, description="keep the full Sx, Sy in stats/ even without PCA "
                                                  "(about one more GEMM per token)")

    @field_validator("pca_dim")
    @classmethod
    def _pca_dim(cls, k: int | None) -> int | None:
        if k is not None and k < 1:
            raise ValueError(f"--pca-dim must be >= 1, got {k}")
        return k

    @field_validator("cosine_tokens")
    @classmethod
    def _cosine_tokens(cls, n: int) -> int:
        if n < 0:
            raise ValueError(f"--cosine-tokens must be >= 0 (0 = every token), got {n}")
        return n

    @field_validator("layer_weights")
    @classmethod
    def _weights(cls, pairs: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        for layer, w in pairs:
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"--layer-weight {layer}={w}: weights must be finite and >= 0")
        return pairs
