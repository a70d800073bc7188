"""The names of the QA metrics and of the layers they are computed at (one list each)."""

from __future__ import annotations

import re

METRICS_VERSION = "1"


METRICS = ("logit_kl", "hidden_state_cosine", "residual_rms", "surprisal")


LOGIT_METRICS = ("logit_kl", "surprisal")


LAYER_METRICS = ("hidden_state_cosine", "residual_rms", "residual_rms_ratio")


# Every ledger metric name, in report order.
# The report summary (variant x metric) shows these, in this order.
SUMMARY_METRICS = ("logit_kl", "surprisal", "perplexity", "hidden_state_cosine", "residual_rms_ratio")
LEDGER_METRICS = ("logit_kl", "surprisal", "perplexity", "hidden_state_cosine", "residual_rms", "residual_rms_ratio")


_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)$")


def layer_sort_key(layer: str) -> tuple[int, str]:
    m = _BLOCK.match(layer)
    return (int(m.group(1)) if m else 1 << 30, layer)


def is_residual_layer(hook_point: str) -> bool:
    """Decoder block outputs (`model.layers.3`) are residuals; sub-modules and inputs are not."""
    return _BLOCK.match(hook_point) is not None
