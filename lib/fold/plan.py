"""What the fold does to each tensor: checkpoint-wide decisions (`plan_layout`: untie, fold
or permute the norm gains) and per-tensor `TensorOps` (`plan_tensor_ops`). See lib.fold.checkpoint
for the math (its module docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.fold.checks import is_signed_permutation
from lib.fold.options import FoldOptions
from lib.fold.transform_set import WeightTransformSet
from lib.models.adapters.base import NORM_KINDS, READER_NORM, WRITERS, ModelAdapter, TensorRole


@dataclass(frozen=True)
class FoldLayout:
    """Checkpoint-wide decisions: untie the head? fold gains? permute gains (signed-perm Q)?"""

    source_tied: bool
    untie: bool  # write lm_head.weight and tie_word_embeddings=false
    fold_gains: bool  # γ folded into readers, norms set to 1
    permute_gains: bool  # γ ← γ·|Q| (signed-permutation Q on a tied model keeps the tie)

    @property
    def output_tied(self) -> bool:
        return self.source_tied and not self.untie


def plan_layout(transforms: WeightTransformSet, adapter: ModelAdapter) -> FoldLayout:
    """Untie / fold / permute the gains? Only a residual rotation touches gains and the tie; a
    signed-permutation Q on a tied model keeps the tie by permuting the gains (exact)."""
    tied = adapter.tied_embeddings
    if not transforms.has_rotation:
        return FoldLayout(tied, untie=False, fold_gains=False, permute_gains=False)
    signed = (tied and transforms.exact and transforms.residual_rotation is not None
              and is_signed_permutation(transforms.residual_rotation))
    if signed:
        return FoldLayout(tied, untie=False, fold_gains=False, permute_gains=True)
    return FoldLayout(tied, untie=tied, fold_gains=True, permute_gains=False)


@dataclass(frozen=True, eq=False)
class TensorOps:
    """What to do with one tensor. The tensor is viewed "internal axis first" as X [m, n]:
    readers (q/k/v/gate/up/lm_head/embed) as W, writers (o/down) as Wᵀ; then

        X ← blocks ⊛ X[gather]        (row gather; block-diagonal [m/bs, bs, bs] left multiply)
        X ← X · diag(scale) · rotation (residual axis: gain fold, residual rotation)

    `fill_ones` replaces the tensor by ones (a folded norm gain); `source` is the tensor to read
    (embed_tokens for an untied lm_head). 1-D tensors are [m, 1] (internal) or [1, n] (residual)."""

    name: str
    source: str
    orient: str = "rows"  # rows: X = W; cols: X = Wᵀ; vec_internal: X = b[:, None]; vec_residual: X = b[None, :]
    gather: np.ndarray | None = None
    blocks: np.ndarray | None = None
    scale: np.ndarray | None = None
    rotation: np.ndarray | None = None
    fill_ones: bool = False

    @property
    def is_identity(self) -> bool:
        return (not self.fill_ones and self.gather is None and self.blocks is None and self.scale is None
                and self.rotation is None)


def _expand_heads(perm: np.ndarray, hd: int) -> np.ndarray:
    """Row indices of a head permutation: block j of the result is block perm[j] of the source."""
    return (perm[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)


def plan_tensor_ops(role: TensorRole, transforms: WeightTransformSet, adapter: ModelAdapter, layout: FoldLayout,
                    gains: Mapping[str, np.ndarray]) -> TensorOps:
    """The TensorOps of one checkpoint tensor. `gains` maps norm tensor names to their γ [d]
    (float64; needed only when gains are folded)."""
    kind, part, i = role.kind, role.part, role.layer
    name = role.name
    if kind in ("q_norm", "k_norm"):
        return TensorOps(name, name)  # per-head gains: RoPE acts inside each head, so never touched
    if kind in NORM_KINDS:
        q = transforms.head_rotation() if kind == "final_norm" else transforms.block_rotation(i)
        if q is None:
            return TensorOps(name, name)
        if layout.fold_gains:
            return TensorOps(name, name, fill_ones=True)
        if layout.permute_gains:
            return TensorOps(name, name, orient="vec_residual", rotation=np.abs(q))
        return TensorOps(name, name)  # unreachable from plan_layout (a test may inject this known bug)
    if kind == "embed" or (kind == "lm_head" and layout.output_tied):
        # Tied output keeps lm_head == embed: both get E·Q and nothing else.
        q = transforms.embed_rotation() if kind == "embed" else transforms.head_rotation()
        return TensorOps(name, name, rotation=q)
    if kind == "lm_head":
        q = transforms.head_rotation()
        source = name if not layout.source_tied else adapter.tensor_name("embed")
        gamma = gains.get(adapter.tensor_name("final_norm")) if layout.fold_gains and q is not None else None
        return TensorOps(name, source, scale=gamma, rotation=q)

    q = transforms.block_rotation(i)
    hd, r = adapter.head_dim, adapter.group_size
    gather = blocks = None
    hp = transforms.head_permutations.get(i)
    if kind in ("q", "o") and hp is not None:
        gather = _expand_heads(hp.perm, hd)
    elif kind in ("k", "v") and hp is not None:
        gather = _expand_heads(hp.kv_perm, hd)
    elif kind in ("gate", "up", "down") and i in transforms.neuron_permutations:
        gather = transforms.neuron_permutations[i]
    # Per-head rotations, as left multiplies of each head's rows (Wᵀ rows for o_proj).
    vo, qk = transforms.vo_rotations.get(i), transforms.qk_rotations.get(i)
    if kind == "v" and vo is not None:
        blocks = np.swapaxes(vo, -1, -2)  # v rows of kv head g: Rᵀ
    elif kind == "o" and vo is not None:
        blocks = np.swapaxes(vo, -1, -2)[np.arange(adapter.num_heads) // r]  # (O_h R)ᵀ = Rᵀ O_hᵀ
    elif kind == "k" and qk is not None:
        blocks = np.swapaxes(qk, -1, -2)
    elif kind == "q" and qk is not None:
        blocks = np.swapaxes(qk, -1, -2)[np.arange(adapter.num_heads) // r]

    if kind in READER_NORM:  # q k v gate up
        if part == "bias":
            return TensorOps(name, name, "vec_internal", gather, blocks)
        norm = adapter.tensor_name(READER_NORM[kind], i)
        gamma = gains.get(norm) if layout.fold_gains and q is not None else None
        return TensorOps(name, name, "rows", gather, blocks, gamma, q)
    if kind in WRITERS:  # o down
        if part == "bias":
            return TensorOps(name, name, "vec_residual", rotation=q)
        return TensorOps(name, name, "cols", gather, blocks, None, q)
    raise BadInputError(f"{name}: tensor kind {kind!r} has no fold rule")


def _roles(names: list[str], adapter: ModelAdapter, transforms: WeightTransformSet) -> dict[str, TensorRole | None]:
    roles = {n: adapter.classify(n) for n in names}
    unknown = [n for n, r in roles.items() if r is None and not adapter.is_passthrough(n)]
    if unknown and not transforms.is_identity:
        raise BadInputError(
            f"checkpoint tensor(s) {unknown[:5]} are not known to the {adapter.model_type} adapter, so the fold cannot "
            "tell whether they read or write the residual stream; teach lib/models/adapters/ about them")
    return roles


def check_checkpoint_shapes(shapes: Mapping[str, tuple[int, ...]], adapter: ModelAdapter) -> None:
    """Every tensor the config implies is present with the implied shape (lm_head may be absent
    from a tied checkpoint). Raises BadInputError naming the tensor and both shapes."""
    for name, want in adapter.expected_tensors().items():
        got = shapes.get(name)
        if got is None:
            raise BadInputError(f"checkpoint has no tensor {name!r} that its config.json implies "
                                f"({adapter.model_type}); the weights and the config disagree")
        if tuple(got) != tuple(want):
            raise BadInputError(f"checkpoint tensor {name!r} has shape {list(got)} but config.json implies {list(want)}; "
                                "the weights and the config disagree")
    lm = adapter.tensor_name("lm_head")
    if lm in shapes and tuple(shapes[lm]) != adapter.tensor_shape("lm_head"):
        raise BadInputError(f"checkpoint tensor {lm!r} has shape {list(shapes[lm])}, config implies "
                            f"{list(adapter.tensor_shape('lm_head'))}")


def _output_names(names: list[str], adapter: ModelAdapter, layout: FoldLayout) -> list[str]:
    lm = adapter.tensor_name("lm_head")
    out = list(names)
    if layout.untie and lm not in out:
        out.append(lm)
    return out


def output_config(config: Mapping[str, Any], layout: FoldLayout, options: FoldOptions) -> dict[str, Any]:
    """config.json of the folded checkpoint: the source's, with the tie flag and dtype updated."""
    cfg = dict(config)
    if layout.untie:
        cfg["tie_word_embeddings"] = False
    if options.dtype is not None:
        # transformers 5 reads "dtype", older loaders "torch_dtype": update whichever the source has.
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[key] = options.dtype
    return cfg


def norm_gains(read, names: list[str], roles: Mapping[str, TensorRole | None]) -> dict[str, np.ndarray]:
    """γ [d] float64 of every residual norm (small: read up front so readers can fold them)."""
    import torch

    return {n: read(n).to(torch.float64).numpy()
            for n in names if roles.get(n) is not None and roles[n].kind in NORM_KINDS}
