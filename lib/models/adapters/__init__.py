"""Model adapters: all architecture knowledge, one small class per family (as SliceGPT does).

Capture, transports and the fold ask an adapter; none of them index `model.model.layers[...]`.
Use `adapter_for_config(config)` (a transformers config or a plain config.json dict).
"""

from __future__ import annotations

from typing import Any

from lib.core.errors import BadInputError
from lib.models.adapters.base import ModelAdapter
from lib.models.adapters.llama import LlamaAdapter
from lib.models.adapters.qwen2 import Qwen2Adapter
from lib.models.adapters.qwen3 import Qwen3Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": LlamaAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
}


def adapter_for_config(config: Any) -> ModelAdapter:
    """The adapter for a transformers config object or a config.json dict."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    model_type = cfg.get("model_type")
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise BadInputError(
            f"config.model_type={model_type!r} is not supported; supported families: {sorted(ADAPTERS)}. "
            "Add an adapter in lib/models/adapters/ for it."
        )
    return cls(cfg)
