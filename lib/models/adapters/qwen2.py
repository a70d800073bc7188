"""Qwen2 family: like Llama plus biases on q/k/v (reader biases: unchanged by a residual
rotation, but permuted with their heads and rotated by a V/O rotation); o_proj has no bias.
head_dim is hidden_size // num_attention_heads unless the config says otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from lib.models.adapters.base import ModelAdapter


@dataclass
class Qwen2Adapter(ModelAdapter):
    model_type: str = "qwen2"
    has_qkv_bias: bool = True

    @property
    def o_bias(self) -> bool:
        return False  # Qwen2Attention: o_proj bias=False whatever the config says
