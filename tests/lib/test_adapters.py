"""Model adapters against real HF checkpoints: tensor names, shapes, biases, GQA, ties, errors."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lib.core.errors import BadInputError
from lib.models.adapters import ADAPTERS, adapter_for_config


def checkpoint_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


@pytest.mark.parametrize("family,tie", [("qwen3", False), ("qwen3", True), ("qwen2", False), ("llama", True)])
def test_expected_tensors_match_a_saved_checkpoint(make_tiny, family, tie):
    model_dir = make_tiny(family, tie=tie)
    adapter = adapter_for_config(json.loads((model_dir / "config.json").read_text()))
    saved = checkpoint_shapes(model_dir)
    # The oracle is what save_pretrained wrote: exactly these names and shapes.
    assert adapter.expected_tensors() == saved
    assert adapter.tied_embeddings is tie and ("lm_head.weight" in saved) is (not tie)
    for name in saved:
        role = adapter.classify(name)
        assert role is not None and adapter.tensor_name(role.kind, role.layer, role.part) == name
    assert adapter.qkv_bias is (family == "qwen2") and adapter.has_qk_norm is (family == "qwen3")
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim, adapter.group_size) == (4, 2, 32, 2)
    assert adapter.norm_eps == 1e-6


def test_capture_api_still_names_real_modules(make_tiny):
    model_dir = make_tiny("qwen2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = adapter_for_config(model.config)
    assert adapter.block_names() == ["model.layers.0", "model.layers.1"]
    assert adapter.base_model(model) is model.model
    for i in range(adapter.num_layers):
        for hook in (adapter.mlp_down_input(i), adapter.attn_o_input(i)):
            model.get_submodule(hook.removesuffix(":input"))
    params = dict(model.named_parameters())
    for name in adapter.expected_tensors():
        assert name in params
    assert adapter.block_index("model.layers.1") == 1
    assert adapter.block_index("model.layers.2") is None and adapter.block_index("layers.0") is None


def test_unknown_names_and_passthrough_buffers():
    adapter = adapter_for_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                                  "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 10})
    assert adapter.classify("model.layers.2.mlp.up_proj.weight") is None  # layer out of range
    assert adapter.classify("model.layers.0.mlp.experts.0.weight") is None
    assert adapter.classify("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert adapter.is_passthrough("model.layers.0.self_attn.rotary_emb.inv_freq")
    role = adapter.classify("model.layers.1.self_attn.o_proj.bias")
    assert (role.kind, role.part, role.layer) == ("o", "bias", 1)


@pytest.mark.parametrize("cfg,qkv,o,mlp", [
    ({"model_type": "llama", "attention_bias": True}, True, True, False),
    ({"model_type": "llama", "mlp_bias": True}, False, False, True),
    ({"model_type": "qwen2", "attention_bias": True}, True, False, False),
    ({"model_type": "qwen3", "attention_bias": True}, True, True, False),
])
def test_bias_flags_follow_the_hf_modules(cfg, qkv, o, mlp):
    base = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
            "vocab_size": 10}
    adapter = adapter_for_config({**base, **cfg})
    assert (adapter.qkv_bias, adapter.o_bias, adapter.mlp_bias) == (qkv, o, mlp)
    expected = adapter.expected_tensors()
    assert ("model.layers.0.self_attn.o_proj.bias" in expected) is o
    assert ("model.layers.0.mlp.down_proj.bias" in expected) is mlp


def test_unsupported_architecture_and_bad_gqa_are_clear_errors():
    with pytest.raises(BadInputError, match=r"config.model_type='gemma2'.*supported families"):
        adapter_for_config({"model_type": "gemma2"})
    assert set(ADAPTERS) == {"llama", "qwen2", "qwen3"}
    adapter = adapter_for_config({"model_type": "qwen3", "num_hidden_layers": 1, "hidden_size": 64,
                                  "num_attention_heads": 3, "num_key_value_heads": 2, "intermediate_size": 8,
                                  "vocab_size": 10})
    with pytest.raises(BadInputError, match="num_attention_heads=3 is not a multiple of num_key_value_heads=2"):
        adapter.check_supported()
