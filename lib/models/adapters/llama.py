"""Llama family: RMSNorm pre-norm decoder, GQA, optional tied embeddings; biases only when the
config sets `attention_bias` (q/k/v/o) or `mlp_bias` (gate/up/down)."""

from __future__ import annotations

from dataclasses import dataclass

from lib.models.adapters.base import ModelAdapter


@dataclass
class LlamaAdapter(ModelAdapter):
    model_type: str = "llama"
