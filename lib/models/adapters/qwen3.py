"""Qwen3 family: no q/k/v biases (unless `attention_bias`), but per-head RMSNorm on q and k
(q_norm/k_norm, shape [head_dim], shared by all heads) after the projection: never rotate
inside a q/k head or touch those gains. Head permutations leave them alone (they are shared)."""

from __future__ import annotations

from dataclasses import dataclass

from lib.models.adapters.base import ModelAdapter


@dataclass
class Qwen3Adapter(ModelAdapter):
    model_type: str = "qwen3"
    has_qk_norm: bool = True
