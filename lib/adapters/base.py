"""The adapter base class: a pre-norm decoder with RMSNorm (Llama, Qwen2, Qwen3 and kin).

An adapter is built from the config dict alone (no weights), so the streaming fold can ask it
questions about tensor names without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ModelAdapter:
    config: dict[str, Any]

    # --- names of things -------------------------------------------------------------------
    model_type: str = "base"
    layers_prefix: str = "model.layers"
    embed_name: str = "model.embed_tokens"
    final_norm_name: str = "model.norm"
    lm_head_name: str = "lm_head"
    has_qkv_bias: bool = False
    has_qk_norm: bool = False

    # --- shapes ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        hd = self.config.get("head_dim")
        return int(hd) if hd else self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def norm_eps(self) -> float:
        return float(self.config.get("rms_norm_eps", 1e-6))

    # --- modules ---------------------------------------------------------------------------
    def block_name(self, i: int) -> str:
        """Module name of decoder block i; its output is the residual stream after block i."""
        return f"{self.layers_prefix}.{i}"

    def block_names(self) -> list[str]:
        return [self.block_name(i) for i in range(self.num_layers)]

    def base_model(self, model: Any) -> Any:
        """The decoder without lm_head (so capture can skip the vocabulary projection)."""
        return model.model

    def mlp_down_input(self, i: int) -> str:
        """Hook point whose input holds the MLP neurons of block i (for neuron matching)."""
        return f"{self.block_name(i)}.mlp.down_proj:input"

    def attn_o_input(self, i: int) -> str:
        """Hook point whose input holds the per-head attention outputs of block i."""
        return f"{self.block_name(i)}.self_attn.o_proj:input"
