"""Llama family: RMSNorm pre-norm decoder, GQA, no attention biases, optional tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass

from lib.adapters.base import ModelAdapter


@dataclass
class LlamaAdapter(ModelAdapter):
    model_type: str = "llama"
