"""`WeightTransformSet`: the function-preserving weight transforms one fold applies, validated.

Built from a `transforms.json` spec (`WeightTransformSet.from_spec`, the format the transports
solver writes, or a hand-written one) or from arrays (`WeightTransformSet.from_arrays`, for the
demo and tests). Everything is validated before any weight is touched: orthogonality (reports
max|QᵀQ − I|), shapes against the config, permutations are permutations, head permutations
respect GQA groups, `head_dim` matches, files exist and stay inside the spec's run directory,
layer names exist. Transforms that cannot be folded exactly (per-layer rotations that differ,
rotations inside a q/k head, query heads moved across kv groups) raise `NotExactError` unless
`allow_inexact=True`; then they are kept and `inexact_reasons` says why.

Conventions (shared with lib/transports.py, see TEAM_NOTES / DESIGN §4):

- residual rotation Q [d, d] float64: row-vector residuals, the fold maps h ↦ h·Q.
- permutation perm [n] int64: the permuted model's unit j is the source's unit perm[j].
- head permutation over query heads [H]; kv_perm [G] is derived (new kv head g = old kv_perm[g]).
- V/O rotation R [G, hd, hd]: indexed by the *permuted* model's kv heads; v rows by Rᵀ, o_proj
  column blocks of the group's query heads by R.

Order of application (lib/fold.py): untie → fold norm gains → permutations → V/O (q/k)
rotations → residual rotation. Residual and internal transforms act on different axes.

Write a spec from arrays with `write_transform_spec(folder, config, ...)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.adapters import adapter_for_config
from lib.adapters.base import ModelAdapter
from lib.atomic import write_atomic, write_text_atomic
from lib.digests import sha256_file, sha256_json
from lib.errors import BadInputError, NotExactError

SPEC_VERSION = 1
ORTHO_TOL = 1e-5  # max |QᵀQ − I| entry; a float64 polar factor sits near 1e-14
SAME_ROTATION_TOL = 1e-6  # per-layer Q_l counts as "the global Q" within this max-abs distance
LAYER_PATH_KEYS = ("rotation_path", "head_permutation_path", "neuron_permutation_path", "vo_rotation_path",
                   "qk_rotation_path")
TOP_PATH_KEYS = ("residual_rotation_path",)
INEXACT_HINT = "pass --allow-inexact to fold it anyway (the equivalence gate then reports the drift instead of passing)"


# ----------------------------------------------------------------------------------------------
# small value types
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class HeadPermutation:
    """perm [H] int64 over query heads, kv_perm [G] int64 over kv heads; `exact` False when the
    permutation moves a query head across kv groups (kv_perm is then a best effort)."""

    perm: np.ndarray
    kv_perm: np.ndarray
    exact: bool = True


def _as_layer_index(adapter: ModelAdapter, key: int | str, what: str) -> int:
    if isinstance(key, int | np.integer) and 0 <= int(key) < adapter.num_layers:
        return int(key)
    if isinstance(key, str):
        i = adapter.block_index(key)
        if i is not None:
            return i
    raise BadInputError(
        f"{what}: unknown layer name {key!r}; this {adapter.model_type} checkpoint has blocks "
        f"{adapter.block_name(0)} … {adapter.block_name(adapter.num_layers - 1)}. Fix the layer name in the spec.")


def orthogonality_error(q: np.ndarray) -> float:
    """max |QᵀQ − I| over entries (float64). For q [..., n, n] the max over the batch."""
    q = np.asarray(q, dtype=np.float64)
    eye = np.eye(q.shape[-1])
    return float(np.max(np.abs(np.swapaxes(q, -1, -2) @ q - eye))) if q.size else 0.0


def is_signed_permutation(q: np.ndarray, tol: float = 1e-12) -> bool:
    """True when Q has one ±1 per row and column (then norm gains can be permuted, not folded)."""
    a = np.abs(np.asarray(q, dtype=np.float64))
    ones = np.abs(a - 1.0) <= tol
    zeros = a <= tol
    return bool(np.all(ones | zeros) and np.all(ones.sum(0) == 1) and np.all(ones.sum(1) == 1))


def check_rotation(q: Any, n: int, what: str, batch: int | None = None) -> tuple[np.ndarray, float]:
    """Validate a rotation: shape [n, n] (or [batch, n, n]), finite, orthogonal. Returns (float64, err)."""
    arr = np.asarray(q)
    want = (n, n) if batch is None else (batch, n, n)
    if arr.shape != want:
        raise BadInputError(f"{what}: rotation has shape {list(arr.shape)}, expected {list(want)} "
                            "(from the config); write a matrix for this model's dimensions")
    if not np.issubdtype(arr.dtype, np.floating):
        raise BadInputError(f"{what}: rotation has dtype {arr.dtype}, expected float64")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise BadInputError(f"{what}: rotation holds NaN/inf; re-solve it")
    err = orthogonality_error(arr)
    if err > ORTHO_TOL:
        raise BadInputError(
            f"{what}: not orthogonal: max|QᵀQ − I| = {err:.3g} > {ORTHO_TOL:g}. Only orthogonal matrices fold "
            "exactly; take the polar factor (U Vᵀ of its SVD) and save it in float64.")
    return arr, err


def check_permutation(p: Any, n: int, what: str) -> np.ndarray:
    """Validate a permutation of 0..n-1 (1-D integer). Returns int64."""
    arr = np.asarray(p)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise BadInputError(f"{what}: permutation has shape {list(arr.shape)}, expected [{n}] (from the config)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise BadInputError(f"{what}: permutation has dtype {arr.dtype}, expected int64")
    arr = arr.astype(np.int64)
    if not np.array_equal(np.sort(arr), np.arange(n)):
        missing = sorted(set(range(n)) - set(arr.tolist()))[:5]
        dup = sorted({int(x) for x in arr if (arr == x).sum() > 1})[:5]
        raise BadInputError(f"{what}: not a permutation of 0..{n - 1} (missing {missing}, repeated {dup}); "
                            "every unit must appear exactly once")
    return arr


def derive_kv_permutation(perm: np.ndarray, num_heads: int, num_kv_heads: int) -> tuple[np.ndarray | None, list[str]]:
    """kv_perm [G] from a query-head permutation, or (None, problems) when a query head moves
    across kv groups. New kv group g holds query heads g*r … g*r+r−1 (r = H/G)."""
    r = num_heads // num_kv_heads
    kv = np.empty(num_kv_heads, dtype=np.int64)
    problems = []
    for g in range(num_kv_heads):
        heads = perm[g * r:(g + 1) * r]
        groups = sorted({int(h) // r for h in heads})
        if len(groups) != 1:
            problems.append(f"new kv group {g} would take old query heads {heads.tolist()} from old kv groups {groups}")
        kv[g] = int(heads[0]) // r
    if problems:
        return None, problems
    return kv, []


def _best_effort_kv_permutation(perm: np.ndarray, num_heads: int, num_kv_heads: int,
                                given: np.ndarray | None) -> np.ndarray:
    """For an inexact (GQA-breaking) head permutation: the given kv_perm if it is one, else the
    majority old group per new group if that is a permutation, else the identity."""
    if given is not None and np.array_equal(np.sort(given), np.arange(num_kv_heads)):
        return given.astype(np.int64)
    r = num_heads // num_kv_heads
    kv = np.array([np.bincount(perm[g * r:(g + 1) * r] // r, minlength=num_kv_heads).argmax()
                   for g in range(num_kv_heads)], dtype=np.int64)
    return kv if np.array_equal(np.sort(kv), np.arange(num_kv_heads)) else np.arange(num_kv_heads, dtype=np.int64)


def check_head_permutation(perm: Any, adapter: ModelAdapter, what: str, allow_inexact: bool,
                           kv_given: Any = None) -> tuple[HeadPermutation, list[str]]:
    """Validate a query-head permutation under GQA; returns it with its kv permutation and any
    inexactness reasons (raises NotExactError for those unless allow_inexact)."""
    H, G = adapter.num_heads, adapter.num_kv_heads
    p = check_permutation(perm, H, what)
    kv_arr = None
    if kv_given is not None:
        kv_arr = np.asarray(kv_given)
        if kv_arr.shape != (G,) or not np.issubdtype(kv_arr.dtype, np.integer):
            raise BadInputError(f"{what}: 'kv_permutation' has shape {list(kv_arr.shape)} / dtype {kv_arr.dtype}, "
                                f"expected int64 [{G}] (num_key_value_heads)")
    kv, problems = derive_kv_permutation(p, H, G)
    if problems:
        msg = (f"{what}: head permutation breaks the GQA groups ({H} query heads share {G} kv heads, "
               f"{H // G} per group): {'; '.join(problems)}. A query head can only move inside its kv group "
               "(or with its whole group).")
        if not allow_inexact:
            raise NotExactError(msg + " Fix the permutation, or " + INEXACT_HINT)
        return HeadPermutation(p, _best_effort_kv_permutation(p, H, G, kv_arr), exact=False), [msg]
    if kv_arr is not None and not np.array_equal(kv_arr.astype(np.int64), kv):
        raise BadInputError(f"{what}: stored 'kv_permutation' {kv_arr.tolist()} disagrees with the one the head "
                            f"permutation implies, {kv.tolist()}; drop it or re-derive it")
    return HeadPermutation(p, kv), []


# ----------------------------------------------------------------------------------------------
# the set
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# the spec file
# ----------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def read_spec(spec_path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally check transforms.json (no tensors loaded)."""
    path = Path(spec_path)
    if not path.is_file():
        raise BadInputError(f"{path}: spec file not found; pass --spec runs/<id>/transforms.json (written by "
                            "`tourguide rotate`) or a hand-written one")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise BadInputError(f"{path}: not valid JSON ({str(exc)[:200]}); fix the file") from None
    if not isinstance(spec, dict):
        raise BadInputError(f"{path}: top level must be a JSON object with a 'layers' list")
    if spec.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise BadInputError(f"{path}: version {spec.get('version')!r} is not supported (this build reads version {SPEC_VERSION})")
    unknown = [k for k in spec if k.endswith("_path") and k not in TOP_PATH_KEYS]
    if unknown:
        raise BadInputError(f"{path}: unknown transform key(s) {unknown}; known: {list(TOP_PATH_KEYS)} (a transform this "
                            "build does not understand is never skipped silently)")
    layers = spec.get("layers")
    if not isinstance(layers, list):
        raise BadInputError(f"{path}: 'layers' must be a list of {{\"name\": \"model.layers.N\", ...}} objects "
                            f"(got {type(layers).__name__}); use [] for a residual rotation only")
    for n, entry in enumerate(layers):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadInputError(f"{path}: layers[{n}] must be an object with a string 'name' (e.g. \"model.layers.0\")")
        bad = [k for k in entry if k.endswith("_path") and k not in LAYER_PATH_KEYS]
        if bad:
            raise BadInputError(f"{path}: layers[{n}] ({entry['name']}) has unknown transform key(s) {bad}; "
                                f"known: {list(LAYER_PATH_KEYS)}")
        hd = entry.get("head_dim")
        if hd is not None and (isinstance(hd, bool) or not isinstance(hd, int)):
            raise BadInputError(f"{path}: layers[{n}] ({entry['name']}) head_dim must be an integer, got {hd!r}")
    return spec


def spec_root(spec_path: str | os.PathLike) -> Path:
    """The folder spec paths must stay inside: the run dir containing the spec (nearest ancestor
    with a manifest.json or ledgers/), else the spec's own folder."""
    folder = Path(spec_path).resolve().parent
    for cand in (folder, *folder.parents):
        if (cand / "manifest.json").is_file() or (cand / "ledgers").is_dir():
            return cand
    return folder


def resolve_spec_file(spec_path: Path, rel: str, root: Path, allow_outside: bool, where: str) -> Path:
    try:
        file = (spec_path.resolve().parent / rel).resolve()
        is_file = file.is_file()
    except (ValueError, OSError) as exc:  # NUL byte, unencodable or over-long name, symlink loop
        raise BadInputError(f"{where}: path {rel!r:.80} is not a usable file path ({exc.__class__.__name__}); "
                            "fix the spec") from None
    if not allow_outside and not file.is_relative_to(root):
        raise BadInputError(f"{where}: path {rel!r} resolves to {file}, outside the run directory {root}; "
                            "keep transform files inside the run, or pass --allow-outside-paths")
    if not is_file:
        raise BadInputError(f"{where}: file {rel!r} not found (looked at {file}); paths are relative to the spec's folder")
    return file


def read_spec_tensors(file: Path, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> dict[str, Any]:
    """Named tensors of a small safetensors file as numpy arrays (extra tensors are ignored)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as fh:
            keys = set(fh.keys())
            missing = [k for k in required if k not in keys]
            if missing:
                raise BadInputError(f"{where}: {file.name} has no tensor {missing[0]!r} (it holds {sorted(keys)})")
            return {k: fh.get_tensor(k) for k in (*required, *optional) if k in keys}
    except SafetensorError as exc:
        raise BadInputError(f"{where}: {file} is not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise BadInputError(f"{where}: {file} could not be read ({exc})") from None


def write_transform_spec(folder: str | os.PathLike, config: Any, *, residual_rotation: Any = None,
                         layer_rotations: Mapping[int | str, Any] | None = None,
                         head_permutations: Mapping[int | str, Any] | None = None,
                         neuron_permutations: Mapping[int | str, Any] | None = None,
                         vo_rotations: Mapping[int | str, Any] | None = None,
                         qk_rotations: Mapping[int | str, Any] | None = None,
                         name: str = "transforms.json", with_kv_permutation: bool = True) -> Path:
    """Write arrays as a `transforms.json` + safetensors files in `folder` (the contract format):
    rotations/global.safetensors, rotations/<layer>.{rotation,vo,qk}.safetensors,
    permutations/<layer>.{heads,mlp}.safetensors. Nothing is validated here (tests write bad
    specs on purpose); `WeightTransformSet.from_spec` validates. Returns the spec path."""
    from safetensors.numpy import save_file

    cfg = config if isinstance(config, dict) else config.to_dict()
    adapter = adapter_for_config(cfg)
    folder = Path(folder)
    (folder / "rotations").mkdir(parents=True, exist_ok=True)
    (folder / "permutations").mkdir(parents=True, exist_ok=True)

    def save(rel: str, tensors: dict[str, np.ndarray]) -> str:
        write_atomic(folder / rel, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp)))
        return rel

    def block(k: int | str) -> str:
        return adapter.block_name(k) if isinstance(k, int | np.integer) else str(k)

    spec: dict[str, Any] = {"version": SPEC_VERSION, "model_type": adapter.model_type}
    if residual_rotation is not None:
        spec["residual_rotation_path"] = save("rotations/global.safetensors",
                                              {"rotation": _to_numpy(residual_rotation).astype(np.float64)})
    entries: dict[str, dict[str, Any]] = {}

    def entry(k: int | str) -> dict[str, Any]:
        n = block(k)
        return entries.setdefault(n, {"name": n, "head_dim": adapter.head_dim})

    for k, q in (layer_rotations or {}).items():
        entry(k)["rotation_path"] = save(f"rotations/{block(k)}.rotation.safetensors",
                                         {"rotation": _to_numpy(q).astype(np.float64)})
    for k, p in (head_permutations or {}).items():
        p = _to_numpy(p).astype(np.int64)
        tensors = {"permutation": p}
        kv, _ = derive_kv_permutation(p, adapter.num_heads, adapter.num_kv_heads) if p.ndim == 1 and len(p) == adapter.num_heads else (None, [])
        if with_kv_permutation and kv is not None:
            tensors["kv_permutation"] = kv
        entry(k)["head_permutation_path"] = save(f"permutations/{block(k)}.heads.safetensors", tensors)
    for k, p in (neuron_permutations or {}).items():
        entry(k)["neuron_permutation_path"] = save(f"permutations/{block(k)}.mlp.safetensors",
                                                   {"permutation": _to_numpy(p).astype(np.int64)})
    for k, r in (vo_rotations or {}).items():
        entry(k)["vo_rotation_path"] = save(f"rotations/{block(k)}.vo.safetensors",
                                            {"rotation": _to_numpy(r).astype(np.float64)})
    for k, r in (qk_rotations or {}).items():
        entry(k)["qk_rotation_path"] = save(f"rotations/{block(k)}.qk.safetensors",
                                            {"rotation": _to_numpy(r).astype(np.float64)})
    spec["layers"] = [entries[n] for n in sorted(entries, key=lambda n: (adapter.block_index(n) or 0, n))]
    out = folder / name
    write_text_atomic(out, json.dumps(spec, indent=2) + "\n")
    return out


def random_rotation(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal [n, n] float64 matrix (QR of a Gaussian with sign fix)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def random_head_permutation(num_heads: int, num_kv_heads: int, seed: int = 0) -> np.ndarray:
    """A random GQA-respecting query-head permutation [H] int64 (kv groups and heads inside them)."""
    rng = np.random.default_rng(seed)
    r = num_heads // num_kv_heads
    kv = rng.permutation(num_kv_heads)
    return np.concatenate([kv[g] * r + rng.permutation(r) for g in range(num_kv_heads)]).astype(np.int64)
