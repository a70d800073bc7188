"""Known fold bugs, injected with monkeypatch for the negative controls (never production options).

Each wraps the fold's planning functions where `lib.fold.checkpoint` looks them up, so the fold
(and `prepare_fold`, and the fold flow's tasks, which call the same module) reproduces the bug;
the equivalence gate must then catch it:

- "no_gain_fold":  rotate the residual but leave the norm gains in place (γ not folded into readers);
- "keep_tie":      rotate a tied model without untying lm_head from embed_tokens;
- "unpermuted_qkv_bias": permute q/k/v heads but forget their biases (Qwen2).
"""

from __future__ import annotations

import dataclasses

import pytest

import lib.fold.checkpoint as fold_checkpoint_module
import lib.fold.plan as fold_plan

BUGS = ("no_gain_fold", "keep_tie", "unpermuted_qkv_bias")


def inject_fold_bug(monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    """Make the next folds reproduce `bug` (undone when the test ends)."""
    if bug not in BUGS:
        raise ValueError(f"unknown fold bug {bug!r}; known: {BUGS}")
    plan_layout, plan_tensor_ops = fold_plan.plan_layout, fold_plan.plan_tensor_ops

    def buggy_layout(transforms, adapter):
        layout = plan_layout(transforms, adapter)
        if bug == "no_gain_fold" and layout.fold_gains:
            return dataclasses.replace(layout, fold_gains=False)
        if bug == "keep_tie" and layout.untie:
            return dataclasses.replace(layout, untie=False)
        return layout

    def buggy_ops(role, transforms, adapter, layout, gains):
        ops = plan_tensor_ops(role, transforms, adapter, layout, gains)
        if bug == "unpermuted_qkv_bias" and role.part == "bias" and role.kind in ("q", "k", "v"):
            return dataclasses.replace(ops, gather=None)
        return ops

    monkeypatch.setattr(fold_checkpoint_module, "plan_layout", buggy_layout)
    monkeypatch.setattr(fold_checkpoint_module, "plan_tensor_ops", buggy_ops)
