"""The adapter base class: a pre-norm decoder with RMSNorm (Llama, Qwen2, Qwen3 and kin).

An adapter is built from the config dict alone (no weights), so the streaming fold can ask it
questions about tensor names without loading the model: which tensors read from the residual
stream (and behind which norm), which write to it, which carry biases, how heads group under
GQA, and whether the embeddings are tied.

Tensor *kinds* used by the fold (names below are the HF checkpoint keys, layer i):

    embed       model.embed_tokens.weight             [V, d]   residual rows
    lm_head     lm_head.weight                        [V, d]   reader of the final norm
    final_norm  model.norm.weight                     [d]
    input_norm  model.layers.i.input_layernorm.weight [d]      gain in front of q/k/v
    post_norm   ...post_attention_layernorm.weight    [d]      gain in front of gate/up
    q, k, v     ...self_attn.{q,k,v}_proj.{weight,bias}  [H*hd | G*hd, d]  readers
    o           ...self_attn.o_proj.{weight,bias}     [d, H*hd] writer
    gate, up    ...mlp.{gate,up}_proj.{weight,bias}   [I, d]   readers
    down        ...mlp.down_proj.{weight,bias}        [d, I]   writer
    q_norm, k_norm  ...self_attn.{q,k}_norm.weight    [hd]     (Qwen3; never touched)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lib.core.errors import BadInputError

# Kinds whose weight reads the residual stream (W is out x in, in = d) and the norm in front.
READER_NORM: dict[str, str] = {"q": "input_norm", "k": "input_norm", "v": "input_norm",
                               "gate": "post_norm", "up": "post_norm", "lm_head": "final_norm"}


# Kinds whose weight writes to the residual stream (out = d).
WRITERS: tuple[str, ...] = ("o", "down")


NORM_KINDS: tuple[str, ...] = ("input_norm", "post_norm", "final_norm")


_LAYER_SUFFIX: dict[str, tuple[str, str]] = {
    # kind -> (module path inside block i, part)
    "input_norm": ("input_layernorm", "weight"),
    "post_norm": ("post_attention_layernorm", "weight"),
    "q": ("self_attn.q_proj", "weight"), "k": ("self_attn.k_proj", "weight"),
    "v": ("self_attn.v_proj", "weight"), "o": ("self_attn.o_proj", "weight"),
    "q_norm": ("self_attn.q_norm", "weight"), "k_norm": ("self_attn.k_norm", "weight"),
    "gate": ("mlp.gate_proj", "weight"), "up": ("mlp.up_proj", "weight"), "down": ("mlp.down_proj", "weight"),
}


_MODULE_KIND = {mod: kind for kind, (mod, _) in _LAYER_SUFFIX.items()}


# Buffers some older checkpoints carry; they hold no residual coordinates, copy them as they are.
PASSTHROUGH_SUFFIXES: tuple[str, ...] = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorRole:
    """What one checkpoint tensor is: `kind` (see module docstring), `part` weight|bias, `layer`."""

    name: str
    kind: str
    part: str = "weight"
    layer: int | None = None


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
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def norm_eps(self) -> float:
        return float(self.config.get("rms_norm_eps", 1e-6))

    @property
    def group_size(self) -> int:
        """Query heads per kv head (r = H / G): query head h uses kv head h // r."""
        return self.num_heads // self.num_kv_heads

    # --- biases ----------------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        """q/k/v carry biases (always for Qwen2; `attention_bias` for Llama/Qwen3)."""
        return self.has_qkv_bias or bool(self.config.get("attention_bias", False))

    @property
    def o_bias(self) -> bool:
        return bool(self.config.get("attention_bias", False))

    @property
    def mlp_bias(self) -> bool:
        return bool(self.config.get("mlp_bias", False))

    def has_bias(self, kind: str) -> bool:
        if kind in ("q", "k", "v"):
            return self.qkv_bias
        if kind == "o":
            return self.o_bias
        if kind in ("gate", "up", "down"):
            return self.mlp_bias
        return False

    def check_supported(self) -> None:
        """Raise BadInputError when the config has a shape the fold cannot reason about."""
        if self.num_heads % self.num_kv_heads:
            raise BadInputError(
                f"config.json: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; GQA groups are undefined. Fix the config.")
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in self.config:
                raise BadInputError(f"config.json ({self.model_type}): key {key!r} is missing; "
                                    "pass a complete HF config.json")

    # --- modules ---------------------------------------------------------------------------
    def block_name(self, i: int) -> str:
        """Module name of decoder block i; its output is the residual stream after block i."""
        return f"{self.layers_prefix}.{i}"

    def block_names(self) -> list[str]:
        return [self.block_name(i) for i in range(self.num_layers)]

    def block_index(self, name: str) -> int | None:
        """i for 'model.layers.i' (a block name), else None."""
        m = re.fullmatch(re.escape(self.layers_prefix) + r"\.(\d+)", name)
        if m and int(m.group(1)) < self.num_layers:
            return int(m.group(1))
        return None

    def base_model(self, model: Any) -> Any:
        """The decoder without lm_head (so capture can skip the vocabulary projection)."""
        return model.model

    def mlp_down_input(self, i: int) -> str:
        """Hook point whose input holds the MLP neurons of block i (for neuron matching)."""
        return f"{self.block_name(i)}.mlp.down_proj:input"

    def attn_o_input(self, i: int) -> str:
        """Hook point whose input holds the per-head attention outputs of block i."""
        return f"{self.block_name(i)}.self_attn.o_proj:input"

    # --- checkpoint tensors ----------------------------------------------------------------
    def tensor_name(self, kind: str, layer: int | None = None, part: str = "weight") -> str:
        """The checkpoint key of a tensor kind (see module docstring)."""
        if kind == "embed":
            return f"{self.embed_name}.{part}"
        if kind == "lm_head":
            return f"{self.lm_head_name}.{part}"
        if kind == "final_norm":
            return f"{self.final_norm_name}.{part}"
        if kind not in _LAYER_SUFFIX or layer is None:
            raise KeyError(f"unknown tensor kind {kind!r} (layer {layer})")
        return f"{self.block_name(layer)}.{_LAYER_SUFFIX[kind][0]}.{part}"

    def classify(self, name: str) -> TensorRole | None:
        """The role of checkpoint tensor `name`, or None when this adapter does not know it."""
        for kind in ("embed", "lm_head", "final_norm"):
            for part in ("weight", "bias"):
                if name == self.tensor_name(kind, part=part):
                    return TensorRole(name, kind, part)
        m = re.fullmatch(re.escape(self.layers_prefix) + r"\.(\d+)\.(.+)\.(weight|bias)", name)
        if not m or int(m.group(1)) >= self.num_layers:
            return None
        kind = _MODULE_KIND.get(m.group(2))
        if kind is None:
            return None
        return TensorRole(name, kind, m.group(3), int(m.group(1)))

    def tensor_shape(self, kind: str, part: str = "weight") -> tuple[int, ...]:
        """The shape this config implies for a tensor kind."""
        d, H, G, hd, inter = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        out_in = {"embed": (self.vocab_size, d), "lm_head": (self.vocab_size, d), "q": (H * hd, d),
                  "k": (G * hd, d), "v": (G * hd, d), "o": (d, H * hd), "gate": (inter, d), "up": (inter, d),
                  "down": (d, inter)}
        if kind in ("final_norm", "input_norm", "post_norm"):
            return (d,)
        if kind in ("q_norm", "k_norm"):
            return (hd,)
        if part == "bias":
            return (out_in[kind][0],)
        return out_in[kind]

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a complete checkpoint of this config holds, with its shape. `lm_head` is
        listed only when untied (tied checkpoints usually omit it)."""
        out = {self.tensor_name("embed"): self.tensor_shape("embed"),
               self.tensor_name("final_norm"): self.tensor_shape("final_norm")}
        if not self.tied_embeddings:
            out[self.tensor_name("lm_head")] = self.tensor_shape("lm_head")
        kinds = ["input_norm", "post_norm", "q", "k", "v", "o", "gate", "up", "down"]
        if self.has_qk_norm:
            kinds += ["q_norm", "k_norm"]
        for i in range(self.num_layers):
            for kind in kinds:
                out[self.tensor_name(kind, i)] = self.tensor_shape(kind)
                if self.has_bias(kind):
                    out[self.tensor_name(kind, i, "bias")] = self.tensor_shape(kind, "bias")
        return out

    @staticmethod
    def is_passthrough(name: str) -> bool:
        """Buffers that hold no residual coordinates (copied unchanged by any fold)."""
        return name.endswith(PASSTHROUGH_SUFFIXES)
