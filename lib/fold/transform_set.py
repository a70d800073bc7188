"""`WeightTransformSet`: the function-preserving weight transforms one fold applies, validated.

Built from a `transforms.json` spec (`WeightTransformSet.from_spec`, the format the transports
solver writes, or a hand-written one) or from arrays (`WeightTransformSet.from_arrays`, for the
demo and tests). Everything is validated before any weight is touched: orthogonality (reports
max|QᵀQ − I|), shapes against the config, permutations are permutations, head permutations
respect GQA groups, `head_dim` matches, files exist and stay inside the spec's run directory,
layer names exist. Transforms that cannot be folded exactly (per-layer rotations that differ,
rotations inside a q/k head, query heads moved across kv groups) raise `NotExactError` unless
`allow_inexact=True`; then they are kept and `inexact_reasons` says why.

Conventions (shared with lib/transport/, the fold rules in lib/fold/checkpoint.py):

- residual rotation Q [d, d] float64: row-vector residuals, the fold maps h ↦ h·Q.
- permutation perm [n] int64: the permuted model's unit j is the source's unit perm[j].
- head permutation over query heads [H]; kv_perm [G] is derived (new kv head g = old kv_perm[g]).
- V/O rotation R [G, hd, hd]: indexed by the *permuted* model's kv heads; v rows by Rᵀ, o_proj
  column blocks of the group's query heads by R.

Order of application (lib/fold/checkpoint.py): untie → fold norm gains → permutations → V/O (q/k)
rotations → residual rotation. Residual and internal transforms act on different axes.

Write a spec from arrays with `write_transform_spec(folder, config, ...)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.digests import sha256_file, sha256_json
from lib.core.errors import BadInputError, NotExactError
from lib.fold.checks import (
    INEXACT_HINT,
    SAME_ROTATION_TOL,
    HeadPermutation,
    _as_layer_index,
    _to_numpy,
    check_head_permutation,
    check_permutation,
    check_rotation,
    is_signed_permutation,
)
from lib.fold.spec import read_spec, read_spec_tensors, resolve_spec_file, spec_root
from lib.models.adapters import adapter_for_config
from lib.models.adapters.base import ModelAdapter


@dataclass(frozen=True, eq=False)
class WeightTransformSet:
    """Validated transforms for one checkpoint config. Arrays are numpy float64 / int64.

    residual_rotation: [d, d] the one global Q (None = no residual rotation); when the spec has
        per-layer rotations that differ, `layer_rotations[i]` holds block i's Q_i (inexact).
    head_permutations / neuron_permutations / vo_rotations / qk_rotations: keyed by block index.
    """

    config: Mapping[str, Any]
    residual_rotation: np.ndarray | None = None
    layer_rotations: tuple[np.ndarray | None, ...] | None = None
    head_permutations: Mapping[int, HeadPermutation] = field(default_factory=dict)
    neuron_permutations: Mapping[int, np.ndarray] = field(default_factory=dict)
    vo_rotations: Mapping[int, np.ndarray] = field(default_factory=dict)
    qk_rotations: Mapping[int, np.ndarray] = field(default_factory=dict)
    inexact_reasons: tuple[str, ...] = ()
    orthogonality: Mapping[str, float] = field(default_factory=dict)
    spec_path: str | None = None
    spec_digest: str = ""

    # --- questions the fold asks ------------------------------------------------------------
    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for_config(dict(self.config))

    @property
    def exact(self) -> bool:
        return not self.inexact_reasons

    def block_rotation(self, i: int) -> np.ndarray | None:
        """Q_i applied to block i's readers and writers ([d, d] float64, or None)."""
        if self.layer_rotations is not None:
            return self.layer_rotations[i]
        return self.residual_rotation

    def embed_rotation(self) -> np.ndarray | None:
        """The rotation of the residual entering block 0 (applied to embed_tokens)."""
        return self.block_rotation(0)

    def head_rotation(self) -> np.ndarray | None:
        """The rotation of the residual leaving the last block (applied to lm_head)."""
        return self.block_rotation(int(self.config["num_hidden_layers"]) - 1)

    def rotations(self) -> list[np.ndarray]:
        n = int(self.config["num_hidden_layers"])
        return [q for q in (self.block_rotation(i) for i in range(n)) if q is not None]

    @property
    def has_rotation(self) -> bool:
        return bool(self.rotations())

    @property
    def is_identity(self) -> bool:
        return not (self.has_rotation or self.head_permutations or self.neuron_permutations
                    or self.vo_rotations or self.qk_rotations)

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description (for manifests, reports and the ledger)."""
        return {
            "model_type": self.config.get("model_type"), "exact": self.exact,
            "inexact_reasons": list(self.inexact_reasons),
            "residual_rotation": self.residual_rotation is not None,
            "per_layer_rotations": self.layer_rotations is not None,
            "signed_permutation_rotation": bool(self.residual_rotation is not None
                                                and is_signed_permutation(self.residual_rotation)),
            "head_permutation_layers": sorted(self.head_permutations),
            "neuron_permutation_layers": sorted(self.neuron_permutations),
            "vo_rotation_layers": sorted(self.vo_rotations),
            "qk_rotation_layers": sorted(self.qk_rotations),
            "max_orthogonality_error": max(self.orthogonality.values(), default=0.0),
            "spec_path": self.spec_path, "spec_digest": self.spec_digest,
        }

    def inverse(self) -> WeightTransformSet:
        """The set that undoes this one when applied after it (exact sets only): Qᵀ, inverse
        permutations, and V/O rotations Rᵀ re-indexed by the inverse kv permutation."""
        if not self.exact:
            raise NotExactError("inverse(): only an exact transform set has an exact inverse")
        head_inv = {}
        vo_inv = {}
        for i, hp in self.head_permutations.items():
            head_inv[i] = HeadPermutation(np.argsort(hp.perm), np.argsort(hp.kv_perm))
        for i, r in self.vo_rotations.items():
            kv_inv = head_inv[i].kv_perm if i in head_inv else np.arange(r.shape[0])
            vo_inv[i] = np.swapaxes(r[kv_inv], -1, -2).copy()
        q = self.residual_rotation
        return WeightTransformSet(
            config=self.config, residual_rotation=None if q is None else q.T.copy(), head_permutations=head_inv,
            neuron_permutations={i: np.argsort(p) for i, p in self.neuron_permutations.items()},
            vo_rotations=vo_inv, orthogonality=dict(self.orthogonality),
            spec_digest=("inverse:" + self.spec_digest) if self.spec_digest else "")

    # --- builders ---------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, config: Any, *, residual_rotation: Any = None,
                    layer_rotations: Mapping[int | str, Any] | None = None,
                    head_permutations: Mapping[int | str, Any] | None = None,
                    neuron_permutations: Mapping[int | str, Any] | None = None,
                    vo_rotations: Mapping[int | str, Any] | None = None,
                    qk_rotations: Mapping[int | str, Any] | None = None,
                    kv_permutations: Mapping[int | str, Any] | None = None,
                    allow_inexact: bool = False, spec_path: str | None = None, spec_digest: str = "",
                    labels: Mapping[str, str] | None = None) -> WeightTransformSet:
        """Validate arrays (numpy or torch) against `config` (dict or HF config) and build the set.
        Layer keys are block indices or names ('model.layers.3'). `labels` maps
        '<kind>:<layer>' to a file name for error messages."""
        cfg = config if isinstance(config, dict) else config.to_dict()
        adapter = adapter_for_config(cfg)
        adapter.check_supported()
        labels = dict(labels or {})
        d, G, hd = adapter.hidden_size, adapter.num_kv_heads, adapter.head_dim
        reasons: list[str] = []
        ortho: dict[str, float] = {}

        def label(kind: str, layer: str | None = None) -> str:
            key = f"{kind}:{layer}" if layer is not None else kind
            return labels.get(key, f"{kind} of {layer}" if layer is not None else kind)

        def by_layer(m: Mapping[int | str, Any] | None, kind: str) -> dict[int, Any]:
            out: dict[int, Any] = {}
            for k, v in (m or {}).items():
                i = _as_layer_index(adapter, k, label(kind, str(k)))
                if i in out:
                    raise BadInputError(f"{label(kind, str(k))}: layer {adapter.block_name(i)} is given twice; keep one entry")
                if v is not None:
                    out[i] = _to_numpy(v)
            return out

        q_global = None
        if residual_rotation is not None:
            q_global, ortho["residual_rotation"] = check_rotation(_to_numpy(residual_rotation), d, label("residual_rotation"))

        per_layer = by_layer(layer_rotations, "rotation")
        layer_qs = None
        for i, q in per_layer.items():
            name = adapter.block_name(i)
            per_layer[i], ortho[f"rotation:{name}"] = check_rotation(q, d, label("rotation", name))
        if per_layer:
            blocks = [per_layer.get(i, q_global) for i in range(adapter.num_layers)]
            ref = blocks[0]
            same = all((b is None and ref is None) or (b is not None and ref is not None
                                                       and np.max(np.abs(b - ref)) <= SAME_ROTATION_TOL)
                       for b in blocks)
            if same and ref is not None and (q_global is None or np.max(np.abs(ref - q_global)) <= SAME_ROTATION_TOL):
                q_global = q_global if q_global is not None else ref
            else:
                dist = ["none" if b is None or ref is None else f"{np.max(np.abs(b - ref)):.3g}" for b in blocks]
                msg = (f"{spec_path + ': ' if spec_path else ''}per-layer rotations (layers[].rotation_path) differ "
                       f"between blocks (max|Q_i − Q_0| per block: {', '.join(dist)}; blocks without a "
                       "rotation_path use the global Q or none). The residual stream is shared by every block, so only "
                       "one global Q folds exactly (different ones need SliceGPT's shortcut matrices, which stock "
                       "loaders cannot read). Fold the pooled global Q (residual_rotation_path) instead, or "
                       + INEXACT_HINT)
                if not allow_inexact:
                    raise NotExactError(msg)
                reasons.append(msg)
                layer_qs = tuple(blocks)
                q_global = None

        heads: dict[int, HeadPermutation] = {}
        kv_given = by_layer(kv_permutations, "kv_permutation")
        for i, p in by_layer(head_permutations, "head_permutation").items():
            hp, why = check_head_permutation(p, adapter, label("head_permutation", adapter.block_name(i)),
                                             allow_inexact, kv_given.get(i))
            heads[i] = hp
            reasons += why
        neurons = {i: check_permutation(p, adapter.intermediate_size, label("neuron_permutation", adapter.block_name(i)))
                   for i, p in by_layer(neuron_permutations, "neuron_permutation").items()}
        vo: dict[int, np.ndarray] = {}
        for i, r in by_layer(vo_rotations, "vo_rotation").items():
            name = adapter.block_name(i)
            vo[i], ortho[f"vo_rotation:{name}"] = check_rotation(r, hd, label("vo_rotation", name), batch=G)
        qk: dict[int, np.ndarray] = {}
        for i, r in by_layer(qk_rotations, "qk_rotation").items():
            name = adapter.block_name(i)
            qk[i], ortho[f"qk_rotation:{name}"] = check_rotation(r, hd, label("qk_rotation", name), batch=G)
            msg = (f"{label('qk_rotation', name)}: a rotation inside the q/k heads of {name} is not exact: RoPE rotates "
                   "planes of each q/k head by position" + (" and Qwen3's q_norm/k_norm scale each head coordinate"
                                                           if adapter.has_qk_norm else "")
                   + ", so q·k changes. Drop it, or " + INEXACT_HINT)
            if not allow_inexact:
                raise NotExactError(msg)
            reasons.append(msg)
        return cls(config=dict(cfg), residual_rotation=q_global, layer_rotations=layer_qs, head_permutations=heads,
                   neuron_permutations=neurons, vo_rotations=vo, qk_rotations=qk, inexact_reasons=tuple(reasons),
                   orthogonality=ortho, spec_path=spec_path, spec_digest=spec_digest)

    @classmethod
    def from_spec(cls, spec_path: str | os.PathLike, config: Any, *, allow_inexact: bool = False,
                  allow_outside_paths: bool = False) -> WeightTransformSet:
        """Parse and validate `transforms.json` against a checkpoint config. Raises BadInputError
        (or NotExactError) naming the spec file, key, layer and shape; reads only the spec's files."""
        spec = read_spec(spec_path)
        cfg = config if isinstance(config, dict) else config.to_dict()
        adapter = adapter_for_config(cfg)
        path = Path(spec_path)
        if spec.get("model_type") not in (None, adapter.model_type):
            raise BadInputError(f"{path}: model_type {spec['model_type']!r} does not match the checkpoint's "
                                f"config.model_type {adapter.model_type!r}; fold the spec into the model it was solved for")
        root = spec_root(path)
        files: dict[str, str] = {}
        labels: dict[str, str] = {}

        def load(rel: Any, key: str, tensor: str, layer: str | None, optional: tuple[str, ...] = ()) -> dict[str, Any]:
            where = f"{path} ({key}{'' if layer is None else ' of ' + layer})"
            if rel is None:
                return {}
            if not isinstance(rel, str) or not rel:
                raise BadInputError(f"{where}: expected a relative path string or null, got {rel!r}")
            file = resolve_spec_file(path, rel, root, allow_outside_paths, where)
            files[f"{key}:{layer}"] = sha256_file(file)
            labels[f"{key.removesuffix('_path')}:{layer}" if layer else key.removesuffix('_path')] = f"{file} [{tensor!r}]"
            return read_spec_tensors(file, (tensor,), optional, where)

        kwargs: dict[str, dict[Any, Any]] = {k: {} for k in ("layer_rotations", "head_permutations",
                                                            "neuron_permutations", "vo_rotations", "qk_rotations",
                                                            "kv_permutations")}
        top = load(spec.get("residual_rotation_path"), "residual_rotation_path", "rotation", None)
        seen: set[str] = set()
        for n, entry in enumerate(spec["layers"]):
            name = entry["name"]
            if adapter.block_index(name) is None:
                raise BadInputError(
                    f"{path}: layers[{n}].name {name!r} is not a decoder block of this {adapter.model_type} checkpoint "
                    f"({adapter.block_name(0)} … {adapter.block_name(adapter.num_layers - 1)}); fix the layer name")
            if name in seen:
                raise BadInputError(f"{path}: layers[{n}].name {name!r} appears twice; merge the entries")
            seen.add(name)
            hd = entry.get("head_dim")
            if hd is not None and int(hd) != adapter.head_dim:
                raise BadInputError(f"{path}: layers[{n}] ({name}) head_dim={hd} but the checkpoint's config has "
                                    f"head_dim={adapter.head_dim}; the spec was solved for another model")
            rot = load(entry.get("rotation_path"), "rotation_path", "rotation", name)
            if rot:
                kwargs["layer_rotations"][name] = rot["rotation"]
            hp = load(entry.get("head_permutation_path"), "head_permutation_path", "permutation", name, ("kv_permutation",))
            if hp:
                kwargs["head_permutations"][name] = hp["permutation"]
                if "kv_permutation" in hp:
                    kwargs["kv_permutations"][name] = hp["kv_permutation"]
            npm = load(entry.get("neuron_permutation_path"), "neuron_permutation_path", "permutation", name)
            if npm:
                kwargs["neuron_permutations"][name] = npm["permutation"]
            vo = load(entry.get("vo_rotation_path"), "vo_rotation_path", "rotation", name)
            if vo:
                kwargs["vo_rotations"][name] = vo["rotation"]
            qk = load(entry.get("qk_rotation_path"), "qk_rotation_path", "rotation", name)
            if qk:
                kwargs["qk_rotations"][name] = qk["rotation"]
        digest = sha256_json({"spec": spec, "files": files})
        return cls.from_arrays(cfg, residual_rotation=top.get("rotation"), allow_inexact=allow_inexact,
                               spec_path=str(path), spec_digest=digest, labels=labels, **kwargs)
