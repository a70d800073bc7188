"""Qwen2 family: like Llama plus biases on q/k/v (reader biases, unchanged by a residual rotation)."""

from __future__ import annotations

from dataclasses import dataclass

from lib.adapters.base import ModelAdapter


@dataclass
class Qwen2Adapter(ModelAdapter):
    model_type: str = "qwen2"
    has_qkv_bias: bool = True
