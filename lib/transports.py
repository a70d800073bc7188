"""Transports between a student's and a teacher's captured activations (no Prefect here).

    tourguide rotate --student-index runs/x/activations/student/metadata.jsonl \\
                     --teacher-index runs/x/activations/teacher/metadata.jsonl \\
                     --layer model.layers.0 --layer model.layers.1 \\
                     --ledger runs/x/rotations.jsonl --output-dir runs/x/rotations \\
                     [--pca-dim K] [--exclude-position0] [--solve-permutations] [--spec-out runs/x/transforms.json]

Steps (the rotate flow maps `solve_layer` over layers; `run_rotation` runs them in-process):

1. `plan_rotation` (writes nothing): read both indexes (errors name file:line), pair samples by
   text sha256 and positions, require equal token ids for each paired sample (truncation may
   shorten one side: its prefix must match), check that every layer is captured on both sides
   with one width per side, check --pca-dim, weights and permutation hook points.
2. `solve_layer`, per layer: stream the paired rows once (float64 `CrossMoments`, plus neuron /
   head correlations with --solve-permutations), save the moments to `stats/<layer>.safetensors`,
   solve R_l = polar(C_l) (or k-space PCA Procrustes when widths differ or --pca-dim is given)
   into `<layer>.safetensors`, and the permutations into `permutations/<layer>.{mlp,heads}.safetensors`.
3. `pool_rotation`: the one foldable rotation Q = polar(Σ_l w_l C_l) into `global.safetensors`
   (with --pca-dim: pooled PCA bases, the square student-side completion, and the teacher
   projection as a QA adapter `global.qa_adapter.safetensors`); per layer cosine under Q,
   residual under Q and ‖R_l − Q‖_F.
4. `pca_cosines` (PCA only): a second pass for the mean token cosine of the k-space maps (an
   affine map is not norm-preserving, so its per-token cosine cannot come from the moments).
5. `record_rotation`: one ledger row per layer (append-only; `.jsonl` or a parquet folder),
   `--spec-out` transforms.json (the fold's contract), and a printable table.

Cosines. `cosine_before` is the mean over *all* paired tokens of cos(x, y). For an orthogonal
map, |xR| = |x|, so the mean of cos(xR, y) is tr(Rᵀ Ĉ)/n with Ĉ = Σ x̂ᵀŷ over unit rows: exact
with no second pass. Ĉ costs one GEMM row per token, so it is accumulated over every s-th paired
token, s = ceil(N / cosine_tokens) (default 16384 tokens; 0 = every token, exact): this keeps
the solve within ~1.3x a bare XᵀY accumulation (benchmark P3). The number of tokens behind
`cosine_after` / `cosine_global` is returned as `n_cosine_tokens`.

Residuals. `fit_residual` = ‖X̂ − Y‖²_F / ‖Y‖²_F over all paired tokens (X̂ = X R_l; with PCA
the affine k-space estimate), from the moments; `fit_residual_global` the same under Q.

Files: every tensor file is safetensors (float64 / int64), written atomically. Layer files
carry "rotation" [d_s, d_s] and "singular_values" (+ PCA: "k_rotation", "student_basis",
"teacher_basis", means, variances); global.safetensors also "weights"; permutation files
"permutation" int64 (+ heads: "kv_permutation", "similarity" [H, H]); stats/ holds the moments
(`CrossMoments.load`) so the pooled rotation can be recomputed without the shards.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import BadInputError
from lib.permutations import HeadCorrelation, NeuronCorrelation, match_heads_gqa, match_units
from lib.procrustes import (affine_residual, centred_cross, mean_cosine_under, pca_from_moments,
                            polar, procrustes_residual, solve_pca_procrustes, teacher_adapter)
from lib.shards import ACT_PREFIX, INPUT_SUFFIX, ShardRecord, read_index, resolve_index_path
from lib.transport_stats import CrossMoments, RowSpan, load_tensors, save_tensors, stream_pairs

ROTATION_VERSION = "1"
GLOBAL_NAME = "global"
TOP_SINGULAR_VALUES = 8
DEFAULT_COSINE_TOKENS = 16384
POOL_SCALES = ("raw", "normalized")


# ----------------------------------------------------------------------------------------------
# options and plan
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RotateOptions:
    """How to solve. full_moments: also accumulate the full Sx = Σxᵀx, Sy = Σyᵀy into stats/
    (PCA always does; plain Procrustes needs only their traces). layer_weights: (layer, w) pairs for the pooled rotation (others 1.0);
    pool_scale 'raw' pools Σ w_l C_l as written (layers with larger residuals weigh more),
    'normalized' divides each C_l by sqrt(tr Sx_l tr Sy_l) first. cosine_tokens: cap on the
    tokens behind the after-rotation cosines (0 = all). model_config: config.json (or model
    folder) giving heads / kv heads / head_dim for --solve-permutations (default: the student
    capture's model folder)."""

    pca_dim: int | None = None
    exclude_position0: bool = False
    layer_weights: tuple[tuple[str, float], ...] = ()
    pool_scale: str = "raw"
    cosine_tokens: int = DEFAULT_COSINE_TOKENS
    solve_permutations: bool = False
    model_config: str | None = None
    chunk_rows: int | None = None
    full_moments: bool = False  # keep Sx, Sy in stats/ even without PCA (~one more GEMM per token)

    def check(self) -> None:
        if self.pca_dim is not None and self.pca_dim < 1:
            raise BadInputError(f"--pca-dim must be >= 1, got {self.pca_dim}")
        if self.pool_scale not in POOL_SCALES:
            raise BadInputError(f"--pool-scale {self.pool_scale!r} is not one of {list(POOL_SCALES)}")
        if self.cosine_tokens < 0:
            raise BadInputError(f"--cosine-tokens must be >= 0 (0 = every token), got {self.cosine_tokens}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise BadInputError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        for layer, w in self.layer_weights:
            if not math.isfinite(w) or w < 0:
                raise BadInputError(f"--layer-weight {layer}={w}: weights must be finite and >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_weights"] = [list(p) for p in self.layer_weights]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RotateOptions:
        d = dict(d or {})
        d["layer_weights"] = tuple((str(k), float(v)) for k, v in d.get("layer_weights", ()))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


@dataclass(frozen=True)
class PairedSample:
    """One sample present in both captures: rows [start, stop) of each shard are paired."""

    sample_id: str
    text_sha256: str
    student_shard: str  # absolute paths
    teacher_shard: str
    start: int
    stop: int


@dataclass(frozen=True)
class PermutationLayer:
    """Where the permutation inputs of one decoder block live and how its heads group."""

    layer: str
    mlp_hook: str  # e.g. model.layers.3.mlp.down_proj:input   [T, intermediate_size]
    heads_hook: str  # e.g. model.layers.3.self_attn.o_proj:input  [T, H * head_dim]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


@dataclass(frozen=True)
class RotationPlan:
    """Everything the per-layer work needs, JSON-able (Prefect passes it between tasks)."""

    student_index: str
    teacher_index: str
    layers: tuple[str, ...]
    output_dir: str
    ledger: str | None
    spec_out: str | None
    run_id: str
    options: RotateOptions
    pairs: tuple[PairedSample, ...]
    d_student: int
    d_teacher: int
    n_tokens: int
    cosine_stride: int
    weights: tuple[float, ...]
    unpaired_student: int = 0
    unpaired_teacher: int = 0
    model_type: str | None = None
    head_dim: int | None = None
    permutations: tuple[PermutationLayer, ...] = ()
    tokens_checked: bool = True

    @property
    def pca(self) -> bool:
        return self.options.pca_dim is not None

    @property
    def spans(self) -> list[RowSpan]:
        return [RowSpan(p.student_shard, p.teacher_shard, p.start, p.stop) for p in self.pairs]

    def permutation_for(self, layer: str) -> PermutationLayer | None:
        return next((p for p in self.permutations if p.layer == layer), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = self.options.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RotationPlan:
        d = dict(d)
        d["options"] = RotateOptions.from_dict(d["options"])
        d["layers"] = tuple(d["layers"])
        d["weights"] = tuple(d["weights"])
        d["pairs"] = tuple(PairedSample(**p) for p in d["pairs"])
        d["permutations"] = tuple(PermutationLayer(**p) for p in d.get("permutations", ()))
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# file names
# ----------------------------------------------------------------------------------------------
def safe_layer_name(layer: str) -> str:
    """A file-name form of a hook point ('model.layers.3' stays; ':' and '/' become '_')."""
    return layer.replace("/", "_").replace(":", "_")


def layer_rotation_path(output_dir: str | os.PathLike, layer: str) -> Path:
    return Path(output_dir) / f"{safe_layer_name(layer)}.safetensors"


def layer_stats_path(output_dir: str | os.PathLike, layer: str) -> Path:
    return Path(output_dir) / "stats" / f"{safe_layer_name(layer)}.safetensors"


def global_rotation_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{GLOBAL_NAME}.safetensors"


def qa_adapter_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{GLOBAL_NAME}.qa_adapter.safetensors"


def permutation_paths(output_dir: str | os.PathLike, layer: str) -> tuple[Path, Path]:
    """(heads file, mlp file) of one layer."""
    folder = Path(output_dir) / "permutations"
    return folder / f"{safe_layer_name(layer)}.heads.safetensors", folder / f"{safe_layer_name(layer)}.mlp.safetensors"


def new_run_id() -> str:
    return time.strftime("rotate-%Y%m%dT%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------------------------
# planning: everything that can be wrong with the input is found here, before any write
# ----------------------------------------------------------------------------------------------
def check_output_paths(output_dir: str | os.PathLike, ledger: str | os.PathLike | None,
                       spec_out: str | os.PathLike | None) -> None:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--output-dir {out} is a file; pass a folder (created if missing)")
    if ledger is not None:
        lp = Path(ledger)
        if lp.suffix not in ("", ".jsonl", ".parquet"):
            raise BadInputError(f"--ledger {lp}: use a .jsonl file (JSON lines) or a .parquet / plain folder "
                                "(parquet ledger, one file per append)")
        if lp.suffix != ".jsonl" and lp.exists() and not lp.is_dir():
            raise BadInputError(f"--ledger {lp} is a file, but a parquet ledger is a folder; pass another path or a .jsonl file")
        if lp.suffix == ".jsonl" and lp.is_dir():
            raise BadInputError(f"--ledger {lp} is a folder; a .jsonl ledger is one file")
    if spec_out is not None and Path(spec_out).suffix != ".json":
        raise BadInputError(f"--spec-out {spec_out}: the transforms spec is a .json file (e.g. runs/x/transforms.json)")


def default_layers(student: Sequence[ShardRecord], teacher: Sequence[ShardRecord]) -> tuple[str, ...]:
    """Hook points (module outputs, not ':input' points) captured in every row of both indexes."""
    common = None
    for r in [*student, *teacher]:
        common = set(r.layers) if common is None else common & set(r.layers)
    order = student[0].layers if student else []
    return tuple(h for h in order if h in (common or set()) and not h.endswith(INPUT_SUFFIX))


def _first_by_text(rows: Sequence[ShardRecord]) -> dict[str, ShardRecord]:
    out: dict[str, ShardRecord] = {}
    for r in sorted(rows, key=lambda r: r.sample_index):
        out.setdefault(r.text_sha256, r)
    return out


def _width(index: Path, rec: ShardRecord, hook: str, side: str) -> int:
    """d of act/<hook> [n_tokens, d] in one index row; BadInputError when it is not captured."""
    shape = rec.shapes.get(ACT_PREFIX + hook)
    if shape is None:
        avail = sorted(k.removeprefix(ACT_PREFIX) for k in rec.shapes if k.startswith(ACT_PREFIX))
        raise BadInputError(
            f"layer {hook!r} is not in the {side} capture: {index} row for sample {rec.sample_id!r} ({rec.shard}) "
            f"holds only {avail}. Recapture the {side} with `tourguide capture --layer {hook} …`, or drop that --layer.")
    if len(shape) != 2 or shape[0] != rec.n_tokens:
        raise BadInputError(f"{index}: sample {rec.sample_id!r} stores {ACT_PREFIX + hook} with shape {shape}, "
                            f"expected [{rec.n_tokens}, d]; the index row is inconsistent, recapture it")
    return int(shape[1])


def _side_width(index: Path, rows: Iterable[ShardRecord], hook: str, side: str) -> int:
    widths = {}
    for r in rows:
        widths.setdefault(_width(index, r, hook, side), r.sample_id)
    if len(widths) != 1:
        raise BadInputError(f"{index}: layer {hook!r} has different widths across samples {widths}; "
                            "the folder mixes captures of different models, recapture into a fresh --output-dir")
    return next(iter(widths))


def _read_ids(path: Path) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("input_ids").numpy()
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read input_ids ({exc.__class__.__name__}: {str(exc)[:100]}); "
                            "run `tourguide validate` on the index and recapture that shard") from None


def _pair_tokens(s_dir: Path, t_dir: Path, s: ShardRecord, t: ShardRecord) -> int:
    """The number of leading positions both shards share, after checking their token ids."""
    a, b = _read_ids(s_dir / s.shard), _read_ids(t_dir / t.shard)
    if a.shape != (s.n_tokens,) or b.shape != (t.n_tokens,):
        raise BadInputError(f"sample {s.sample_id!r}: input_ids lengths {a.shape}/{b.shape} disagree with the "
                            f"indexes ({s.n_tokens}/{t.n_tokens}); recapture it")
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    why = None
    if diff.size:
        i = int(diff[0])
        why = f"position {i}: student token {int(a[i])} vs teacher token {int(b[i])}"
    elif a.size != b.size and not (s.truncated if a.size < b.size else t.truncated):
        why = f"student has {a.size} tokens, teacher {b.size}, and the shorter one is not marked truncated"
    if why:
        raise BadInputError(
            f"sample {s.sample_id!r} (text sha256 {s.text_sha256[:12]}…) has different token ids in the student "
            f"({s_dir / s.shard}, tokenizer {s.tokenizer!r}) and the teacher ({t_dir / t.shard}, tokenizer "
            f"{t.tokenizer!r}): {why}. Rotations pair tokens by position, so both models must share a tokenizer; "
            "recapture both with the same one.")
    return n


def load_model_config(ref: str) -> dict[str, Any]:
    """config.json as a dict from a file, a model folder, or a (cached) hub id."""
    p = Path(ref).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{p}: not valid JSON ({exc}); pass the model's config.json with --model-config") from None
        if not isinstance(cfg, dict):
            raise BadInputError(f"{p}: a config.json must hold a JSON object")
        return cfg
    from lib.models import read_config, resolve_model

    try:
        return dict(read_config(resolve_model(ref)))
    except Exception as exc:
        raise BadInputError(f"cannot read the model config of {ref!r} ({str(exc)[:160]}); --solve-permutations needs "
                            "heads / kv heads / head_dim: pass --model-config path/to/config.json") from None


def _plan_permutations(layers: Sequence[str], config_ref: str, s_index: Path, t_index: Path,
                       s_rows: Sequence[ShardRecord], t_rows: Sequence[ShardRecord]) -> tuple[tuple[PermutationLayer, ...], str, int]:
    from lib.adapters import adapter_for_config

    adapter = adapter_for_config(load_model_config(config_ref))
    adapter.check_supported()
    out = []
    for layer in layers:
        i = adapter.block_index(layer)
        if i is None:
            raise BadInputError(f"--solve-permutations: layer {layer!r} is not a decoder block of this "
                                f"{adapter.model_type} model ({adapter.block_name(0)} … "
                                f"{adapter.block_name(adapter.num_layers - 1)}); permutations are per block")
        mlp, heads = adapter.mlp_down_input(i), adapter.attn_o_input(i)
        want = {mlp: adapter.intermediate_size, heads: adapter.num_heads * adapter.head_dim}
        for hook, width in want.items():
            for side, index, rows in (("student", s_index, s_rows), ("teacher", t_index, t_rows)):
                try:
                    got = _side_width(index, rows, hook, side)
                except BadInputError as exc:
                    raise BadInputError(f"--solve-permutations needs the module input {hook!r} on both sides: {exc}") from None
                if got != width:
                    raise BadInputError(f"--solve-permutations: {side} {hook!r} has width {got}, but the model config "
                                        f"({config_ref}) implies {width}; both models must share the architecture "
                                        "(heads, kv heads, head_dim, intermediate_size)")
        out.append(PermutationLayer(layer, mlp, heads, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim,
                                    adapter.intermediate_size))
    return tuple(out), adapter.model_type, adapter.head_dim


def plan_rotation(student_index: str | os.PathLike, teacher_index: str | os.PathLike, layers: Sequence[str] | None,
                  output_dir: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                  spec_out: str | os.PathLike | None = None, options: RotateOptions = RotateOptions(),
                  run_id: str | None = None, check_tokens: bool = True) -> RotationPlan:
    """Validate the inputs and pair the tokens; writes nothing. Raises BadInputError naming the
    file / line / sample / layer for every problem (see the module docstring).

    check_tokens=False skips opening the shards (the CLI's fast pre-check before Prefect starts).
    """
    options.check()
    check_output_paths(output_dir, ledger, spec_out)
    s_index, t_index = resolve_index_path(student_index), resolve_index_path(teacher_index)
    s_rows, t_rows = read_index(s_index), read_index(t_index)
    for side, index, rows in (("student", s_index, s_rows), ("teacher", t_index, t_rows)):
        if not rows:
            raise BadInputError(f"{index}: the {side} index has no rows; capture something first")
    s_by, t_by = _first_by_text(s_rows), _first_by_text(t_rows)
    common = [h for h in s_by if h in t_by]
    if not common:
        raise BadInputError(
            f"no sample is in both captures: {s_index} ({len(s_by)} texts) and {t_index} ({len(t_by)} texts) share no "
            "text sha256. Capture the student and the teacher over the same texts (same --text-file / samples).")
    s_pair, t_pair = [s_by[h] for h in common], [t_by[h] for h in common]

    layers = tuple(layers or default_layers(s_pair, t_pair))
    if not layers:
        raise BadInputError(f"{s_index} and {t_index} share no captured module output; pass --layer model.layers.N")
    dup = sorted({x for x in layers if layers.count(x) > 1})
    if dup:
        raise BadInputError(f"--layer {dup[0]!r} is given twice; give each layer once")
    if GLOBAL_NAME in layers:
        raise BadInputError(f"a layer cannot be called {GLOBAL_NAME!r} (that file holds the pooled rotation)")
    if spec_out is not None and any(x.endswith(INPUT_SUFFIX) for x in layers):
        raise BadInputError(f"--spec-out: the pooled rotation folds as a residual-stream rotation, so fit it on decoder "
                            f"block outputs (model.layers.N), not on module inputs {[x for x in layers if x.endswith(INPUT_SUFFIX)]}")
    widths = {}
    for layer in layers:
        widths[layer] = (_side_width(s_index, s_pair, layer, "student"), _side_width(t_index, t_pair, layer, "teacher"))
    if len(set(widths.values())) != 1:
        raise BadInputError(f"the layers have different widths {widths}; one pooled rotation needs one width per side. "
                            "Rotate layers of different widths in separate invocations.")
    d_s, d_t = widths[layers[0]]
    k = options.pca_dim
    if d_s != d_t and k is None:
        raise BadInputError(f"the student's hidden size is {d_s} and the teacher's {d_t}: pass --pca-dim K "
                            f"(K ≤ {min(d_s, d_t)}) to align them in a shared K-dimensional PCA space")
    if k is not None and k > min(d_s, d_t):
        side = "student" if d_s <= d_t else "teacher"
        raise BadInputError(f"--pca-dim {k} is larger than the {side}'s width {min(d_s, d_t)} "
                            f"(student {d_s}, teacher {d_t}); pass --pca-dim ≤ {min(d_s, d_t)}")

    named = dict(options.layer_weights)
    unknown = sorted(set(named) - set(layers))
    if unknown:
        raise BadInputError(f"--layer-weight names {unknown}, which are not among the --layer points {list(layers)}")
    weights = tuple(float(named.get(layer, 1.0)) for layer in layers)
    if sum(weights) <= 0:
        raise BadInputError("--layer-weight: at least one layer needs a positive weight for the pooled rotation")

    perms, model_type, head_dim = (), None, None
    if options.solve_permutations:
        config_ref = options.model_config or s_pair[0].model
        perms, model_type, head_dim = _plan_permutations(layers, config_ref, s_index, t_index, s_pair, t_pair)
    elif options.model_config:
        from lib.adapters import adapter_for_config

        adapter = adapter_for_config(load_model_config(options.model_config))
        model_type, head_dim = adapter.model_type, adapter.head_dim

    start = 1 if options.exclude_position0 else 0
    pairs = []
    for s, t in zip(s_pair, t_pair, strict=True):
        n = _pair_tokens(s_index.parent, t_index.parent, s, t) if check_tokens else min(s.n_tokens, t.n_tokens)
        pairs.append(PairedSample(s.sample_id, s.text_sha256, str((s_index.parent / s.shard).resolve()),
                                  str((t_index.parent / t.shard).resolve()), start, max(n, start)))
    n_tokens = sum(p.stop - p.start for p in pairs)
    if n_tokens == 0 and check_tokens:
        raise BadInputError(f"{len(pairs)} paired sample(s) hold no token to align"
                            + (" once position 0 is excluded" if start else "") + "; capture longer texts")
    if k is not None and check_tokens and n_tokens < 2:
        raise BadInputError(f"--pca-dim needs at least 2 paired tokens, got {n_tokens}")
    cap = options.cosine_tokens
    stride = 1 if cap == 0 or n_tokens <= cap else math.ceil(n_tokens / cap)
    return RotationPlan(
        student_index=str(s_index), teacher_index=str(t_index), layers=layers, output_dir=str(output_dir),
        ledger=None if ledger is None else str(ledger), spec_out=None if spec_out is None else str(spec_out),
        run_id=run_id or new_run_id(), options=options, pairs=tuple(pairs), d_student=d_s, d_teacher=d_t,
        n_tokens=n_tokens, cosine_stride=stride, weights=weights, unpaired_student=len(s_by) - len(common),
        unpaired_teacher=len(t_by) - len(common), model_type=model_type, head_dim=head_dim, permutations=perms,
        tokens_checked=check_tokens)


# ----------------------------------------------------------------------------------------------
# per-layer solve
# ----------------------------------------------------------------------------------------------
def _meta(plan: RotationPlan, layer: str, kind: str, **extra: Any) -> dict[str, str]:
    base = {"rotation_version": ROTATION_VERSION, "layer": layer, "kind": kind, "run_id": plan.run_id,
            "student_index": plan.student_index, "teacher_index": plan.teacher_index, "n_tokens": str(plan.n_tokens),
            "excluded_position0": str(plan.options.exclude_position0).lower(),
            "convention": "student residual x (row) maps to x @ rotation ≈ teacher residual"}
    return {**base, **{k: str(v) for k, v in extra.items()}}


def _relative(residual: float, teacher_energy: float) -> float:
    """‖X̂ − Y‖²_F / ‖Y‖²_F (NaN for an all-zero teacher)."""
    return residual / teacher_energy if teacher_energy > 0 else float("nan")


def _top(s: np.ndarray) -> list[float]:
    return [float(v) for v in s[:TOP_SINGULAR_VALUES]]


def solve_layer(plan: RotationPlan, layer: str) -> dict[str, Any]:
    """Stream one layer's paired rows once and solve it. Writes stats/<layer>, <layer> and (with
    permutations) permutations/<layer>.{heads,mlp}.safetensors. Returns a JSON-able result."""
    t0 = time.perf_counter()
    d_s, d_t, k = plan.d_student, plan.d_teacher, plan.options.pca_dim
    moments = CrossMoments(d_s, d_t, full=plan.pca or plan.options.full_moments,
                           cosine_stride=0 if plan.pca else plan.cosine_stride)
    tensors = [(ACT_PREFIX + layer, ACT_PREFIX + layer, d_s, d_t)]
    sinks = [moments.update]
    perm = plan.permutation_for(layer)
    neurons = heads = None
    if perm is not None:
        neurons = NeuronCorrelation(perm.intermediate_size, perm.intermediate_size)
        heads = HeadCorrelation(perm.num_heads, perm.head_dim)
        width = perm.num_heads * perm.head_dim
        tensors += [(ACT_PREFIX + perm.mlp_hook, ACT_PREFIX + perm.mlp_hook, perm.intermediate_size, perm.intermediate_size),
                    (ACT_PREFIX + perm.heads_hook, ACT_PREFIX + perm.heads_hook, width, width)]
        sinks += [neurons.update, heads.update]
    n = stream_pairs(plan.spans, tensors, sinks, plan.options.chunk_rows)
    if n != plan.n_tokens:
        raise BadInputError(f"layer {layer}: streamed {n} paired tokens, the plan expected {plan.n_tokens}; "
                            "a shard changed during the run, re-run `tourguide rotate`")
    out = Path(plan.output_dir)
    stats_path = moments.save(layer_stats_path(out, layer), _meta(plan, layer, "stats"))
    result: dict[str, Any] = {"layer": layer, "n_tokens": n, "d_student": d_s, "d_teacher": d_t, "pca_dim": k,
                              "cosine_before": moments.cosine_before, "stats_path": str(stats_path)}
    if not plan.pca:
        r, s = polar(moments.cross)
        result.update(kind="procrustes", cosine_after=mean_cosine_under(r, moments.cross_unit, moments.n_unit),
                      n_cosine_tokens=moments.n_unit,
                      fit_residual=_relative(procrustes_residual(r, moments.cross, moments.sq_x, moments.sq_y), moments.sq_y),
                      top_singular_values=_top(s))
        save_tensors(layer_rotation_path(out, layer), {"rotation": r, "singular_values": s},
                     _meta(plan, layer, "procrustes", **{k_: result[k_] for k_ in (
                         "cosine_before", "cosine_after", "n_cosine_tokens", "fit_residual")}))
    else:
        fit = solve_pca_procrustes(pca_from_moments(moments.gram_x, moments.sum_x, n, k),
                                   pca_from_moments(moments.gram_y, moments.sum_y, n, k),
                                   centred_cross(moments.cross, moments.sum_x, moments.sum_y, n))
        gxc, gyc, cc = _centred(moments)
        save_tensors(layer_rotation_path(out, layer),
                     {"rotation": fit.completion, "k_rotation": fit.r_k, "singular_values": fit.singular_values,
                      "student_basis": fit.student.basis, "teacher_basis": fit.teacher.basis,
                      "student_mean": fit.student.mean, "teacher_mean": fit.teacher.mean,
                      "student_variance": fit.student.variance, "teacher_variance": fit.teacher.variance},
                     _meta(plan, layer, "pca-procrustes", pca_dim=k))
        result.update(kind="pca-procrustes", cosine_after=None, n_cosine_tokens=0,
                      fit_residual=_relative(affine_residual(fit.map, gxc, gyc, cc), moments.sq_y),
                      top_singular_values=_top(fit.singular_values))
    result["rotation_path"] = str(layer_rotation_path(out, layer))
    if perm is not None:
        result["permutations"] = _save_permutations(plan, perm, neurons, heads)
    result["seconds"] = time.perf_counter() - t0
    return result


def _centred(m: CrossMoments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = m.n
    return (m.gram_x - np.outer(m.sum_x, m.sum_x) / n, m.gram_y - np.outer(m.sum_y, m.sum_y) / n,
            centred_cross(m.cross, m.sum_x, m.sum_y, n))


def _save_permutations(plan: RotationPlan, perm: PermutationLayer, neurons: NeuronCorrelation,
                       heads: HeadCorrelation) -> dict[str, Any]:
    mlp = match_units(neurons.correlation())
    sim = heads.similarity()
    hm = match_heads_gqa(sim, perm.num_kv_heads)
    heads_file, mlp_file = permutation_paths(plan.output_dir, perm.layer)
    meta = {"head_dim": perm.head_dim, "num_heads": perm.num_heads, "num_kv_heads": perm.num_kv_heads,
            "convention": "new = old[permutation]; maps the student onto the teacher"}
    save_tensors(heads_file, {"permutation": hm.perm, "kv_permutation": hm.kv_perm, "similarity": sim,
                              "matched_similarity": hm.matched}, _meta(plan, perm.layer, "head-permutation", **meta))
    save_tensors(mlp_file, {"permutation": mlp.perm, "matched_correlation": mlp.matched},
                 _meta(plan, perm.layer, "neuron-permutation", intermediate_size=perm.intermediate_size))
    return {"heads_path": str(heads_file), "mlp_path": str(mlp_file), "head_dim": perm.head_dim,
            "heads_mean_similarity": hm.mean_matched, "heads_identity": bool(np.array_equal(hm.perm, np.arange(perm.num_heads))),
            "mlp_mean_correlation": mlp.mean_matched,
            "mlp_moved": int(np.sum(mlp.perm != np.arange(perm.intermediate_size)))}


# ----------------------------------------------------------------------------------------------
# the pooled global rotation
# ----------------------------------------------------------------------------------------------
def pool_rotation(plan: RotationPlan, layer_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Q = polar(Σ_l w_l C_l) from the saved moments (never the shards); per-layer cosine and
    residual under Q and ‖R_l − Q‖_F. Writes global.safetensors (+ the QA adapter with PCA)."""
    by_layer = {r["layer"]: r for r in layer_results}
    missing = [layer for layer in plan.layers if layer not in by_layer]
    if missing:
        raise BadInputError(f"pooling needs every layer's result; missing {missing}")
    moments = [CrossMoments.load(by_layer[layer]["stats_path"]) for layer in plan.layers]
    scales = []
    for w, m in zip(plan.weights, moments, strict=True):
        if plan.options.pool_scale == "normalized":
            energy = math.sqrt(m.sq_x * m.sq_y) if not plan.pca else math.sqrt(
                max(m.sq_x - m.sum_x @ m.sum_x / m.n, 0) * max(m.sq_y - m.sum_y @ m.sum_y / m.n, 0))
            scales.append(w / energy if energy > 0 else 0.0)
        else:
            scales.append(w)
    out = Path(plan.output_dir)
    per_layer: dict[str, dict[str, float]] = {}
    meta = _meta(plan, GLOBAL_NAME, "global", layers=json.dumps(list(plan.layers)), pool_scale=plan.options.pool_scale)
    adapter_file = None
    if not plan.pca:
        positive = [i for i, sc in enumerate(scales) if sc > 0]
        if len(positive) == 1:
            # polar(w C_l) = polar(C_l) = R_l: reuse it instead of a second d×d SVD.
            only = load_tensors(by_layer[plan.layers[positive[0]]]["rotation_path"])[0]
            q, s = only["rotation"], only["singular_values"] * scales[positive[0]]
        else:
            pooled = np.zeros((plan.d_student, plan.d_teacher))
            for sc, m in zip(scales, moments, strict=True):
                pooled += sc * m.cross
            q, s = polar(pooled)
        q_final = q
        for layer, m in zip(plan.layers, moments, strict=True):
            r = load_tensors(by_layer[layer]["rotation_path"])[0]["rotation"]
            per_layer[layer] = {"cosine_global": mean_cosine_under(q, m.cross_unit, m.n_unit),
                                "fit_residual_global": _relative(procrustes_residual(q, m.cross, m.sq_x, m.sq_y), m.sq_y),
                                "dist_to_global": float(np.linalg.norm(r - q))}
        save_tensors(global_rotation_path(out), {"rotation": q, "singular_values": s,
                                                 "weights": np.asarray(plan.weights, np.float64)}, meta)
    else:
        k = plan.options.pca_dim
        n = moments[0].n
        centred = [_centred(m) for m in moments]
        cov_x = sum(sc * c[0] for sc, c in zip(scales, centred, strict=True)) / n
        cov_y = sum(sc * c[1] for sc, c in zip(scales, centred, strict=True)) / n
        cc = sum(sc * c[2] for sc, c in zip(scales, centred, strict=True))
        zero_x, zero_y = np.zeros(plan.d_student), np.zeros(plan.d_teacher)
        # Pooled covariances are already centred per layer: PCA them with zero means.
        ps = pca_from_moments(cov_x, zero_x, 1, k)
        pt = pca_from_moments(cov_y, zero_y, 1, k)
        fit = solve_pca_procrustes(ps, pt, cc)
        means_x = np.stack([m.mean_x for m in moments])
        means_y = np.stack([m.mean_y for m in moments])
        for layer, m, (gxc, gyc, c_l) in zip(plan.layers, moments, centred, strict=True):
            q_l = load_tensors(by_layer[layer]["rotation_path"])[0]["rotation"]
            per_layer[layer] = {"cosine_global": None,  # filled by pca_cosines (second pass)
                                "fit_residual_global": _relative(affine_residual(fit.map, gxc, gyc, c_l), m.sq_y),
                                "dist_to_global": float(np.linalg.norm(q_l - fit.completion))}
        save_tensors(global_rotation_path(out),
                     {"rotation": fit.completion, "k_rotation": fit.r_k, "singular_values": fit.singular_values,
                      "student_basis": ps.basis, "teacher_basis": pt.basis, "student_mean": means_x,
                      "teacher_mean": means_y, "weights": np.asarray(plan.weights, np.float64)},
                     {**meta, "pca_dim": str(k)})
        adapter_file = qa_adapter_path(out)
        # The adapter acts on the *folded* student (h' = h Q_s): see lib.procrustes.teacher_adapter.
        save_tensors(adapter_file, {"projection": teacher_adapter(fit)["projection"],
                                    "student_mean": means_x @ fit.completion,
                                    "teacher_mean": means_y},
                     {**meta, "kind": "qa-adapter",
                      "usage": "teacher estimate of the folded student's residual h' at layer i: "
                               "(h' - student_mean[i]) @ projection + teacher_mean[i]; i indexes `layers`"})
        s, q_final = fit.singular_values, fit.completion
    return {"rotation_path": str(global_rotation_path(out)),
            "qa_adapter_path": None if adapter_file is None else str(adapter_file),
            "det": float(np.linalg.slogdet(q_final)[0]), "top_singular_values": _top(s),
            "weights": list(plan.weights), "layers": per_layer}


# ----------------------------------------------------------------------------------------------
# PCA: the second pass for the per-token cosine of the affine k-space maps
# ----------------------------------------------------------------------------------------------
class _MapCosine:
    """Σ over tokens of cos(x̂, y), x̂ = ((x − μx) B_s) R_k B_tᵀ + μy (low-rank: O(T k d))."""

    def __init__(self, bs: np.ndarray, rk: np.ndarray, bt: np.ndarray, mx: np.ndarray, my: np.ndarray) -> None:
        self.bs, self.rkbt, self.mx, self.my = bs, rk @ bt.T, mx, my
        self.total, self.n = 0.0, 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        xh = ((x - self.mx) @ self.bs) @ self.rkbt + self.my
        num = np.einsum("ij,ij->i", xh, y)
        den = np.sqrt(np.einsum("ij,ij->i", xh, xh) * np.einsum("ij,ij->i", y, y))
        self.total += float(np.sum(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))
        self.n += x.shape[0]

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


def pca_cosines(plan: RotationPlan, layer: str) -> dict[str, Any]:
    """Mean token cosine (all tokens) of the layer's own k-space map and of the pooled one."""
    own = load_tensors(layer_rotation_path(plan.output_dir, layer))[0]
    glob = load_tensors(global_rotation_path(plan.output_dir))[0]
    i = plan.layers.index(layer)
    a = _MapCosine(own["student_basis"], own["k_rotation"], own["teacher_basis"], own["student_mean"], own["teacher_mean"])
    b = _MapCosine(glob["student_basis"], glob["k_rotation"], glob["teacher_basis"], glob["student_mean"][i],
                   glob["teacher_mean"][i])

    def both(x: np.ndarray, y: np.ndarray) -> None:
        a.update(x, y)
        b.update(x, y)

    stream_pairs(plan.spans, [(ACT_PREFIX + layer, ACT_PREFIX + layer, plan.d_student, plan.d_teacher)], [both],
                 plan.options.chunk_rows)
    return {"layer": layer, "cosine_after": a.mean, "cosine_global": b.mean, "n_cosine_tokens": a.n}


# ----------------------------------------------------------------------------------------------
# recording: ledger rows, transforms.json, the table
# ----------------------------------------------------------------------------------------------
def merge_results(plan: RotationPlan, layer_results: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any],
                  cosines: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One flat dict per layer (in plan order) with everything the ledger and table show."""
    by_layer = {r["layer"]: dict(r) for r in layer_results}
    cos = {c["layer"]: c for c in cosines}
    rows = []
    for layer in plan.layers:
        r = by_layer[layer]
        r.update(pooled["layers"][layer])
        if layer in cos:
            r.update(cosine_after=cos[layer]["cosine_after"], cosine_global=cos[layer]["cosine_global"],
                     n_cosine_tokens=cos[layer]["n_cosine_tokens"])
        rows.append(r)
    return rows


def ledger_rows(plan: RotationPlan, merged: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from lib.ledgers import now_iso

    at = now_iso()
    return [{"run_id": plan.run_id, "recorded_at": at, "layer": r["layer"], "kind": r["kind"],
             "n_tokens": int(r["n_tokens"]), "d_student": int(r["d_student"]), "d_teacher": int(r["d_teacher"]),
             "pca_dim": r["pca_dim"], "cosine_before": r["cosine_before"], "cosine_after": r["cosine_after"],
             "cosine_global": r["cosine_global"], "fit_residual": r["fit_residual"],
             "dist_to_global": r["dist_to_global"], "excluded_position0": plan.options.exclude_position0,
             "top_singular_values": json.dumps([round(v, 6) for v in r["top_singular_values"]]),
             "rotation_path": r["rotation_path"], "student_index": plan.student_index,
             "teacher_index": plan.teacher_index} for r in merged]


def write_transform_spec(plan: RotationPlan, merged: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any]) -> Path:
    """transforms.json for the fold (paths relative to the spec's folder): the pooled Q as
    residual_rotation_path, per-layer head/neuron permutations, rotation_path null (per-layer
    rotations are diagnostics: only the one global Q folds exactly)."""
    from lib.atomic import write_text_atomic

    spec_path = Path(plan.spec_out)
    folder = spec_path.resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.relpath(Path(p).resolve(), folder)

    entries = []
    for r in merged:
        perms = r.get("permutations") or {}
        entry = {"name": r["layer"], "rotation_path": None,
                 "head_permutation_path": rel(perms.get("heads_path")),
                 "neuron_permutation_path": rel(perms.get("mlp_path"))}
        head_dim = perms.get("head_dim", plan.head_dim)
        if head_dim is not None:
            entry["head_dim"] = int(head_dim)
        entries.append(entry)
    spec: dict[str, Any] = {"version": 1}
    if plan.model_type:
        spec["model_type"] = plan.model_type
    spec["residual_rotation_path"] = rel(pooled["rotation_path"])
    spec["layers"] = entries
    spec["provenance"] = {"run_id": plan.run_id, "student_index": plan.student_index,
                          "teacher_index": plan.teacher_index, "n_tokens": plan.n_tokens,
                          "pca_dim": plan.options.pca_dim, "excluded_position0": plan.options.exclude_position0,
                          "qa_adapter": rel(pooled.get("qa_adapter_path"))}
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(spec_path, json.dumps(spec, indent=2, ensure_ascii=False) + "\n")


def fmt_value(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_rotation_table(merged: Sequence[Mapping[str, Any]]) -> str:
    head = (f"{'layer':24} {'kind':14} {'tokens':>8} {'d_s→d_t':>11} {'cos before':>10} {'cos R_l':>8} {'cos Q':>8} "
            f"{'resid R_l':>9} {'resid Q':>8} {'|R_l-Q|':>8} {'top σ':>10}")
    perm = any(r.get("permutations") for r in merged)
    if perm:
        head += f" {'heads sim':>9} {'mlp corr':>8}"
    lines = [head]
    for r in merged:
        line = (f"{r['layer']:24} {r['kind']:14} {r['n_tokens']:>8} {str(r['d_student']) + '→' + str(r['d_teacher']):>11} "
                f"{fmt_value(r['cosine_before']):>10} {fmt_value(r['cosine_after']):>8} {fmt_value(r['cosine_global']):>8} "
                f"{fmt_value(r['fit_residual']):>9} {fmt_value(r['fit_residual_global']):>8} {fmt_value(r['dist_to_global'], '.3f'):>8} "
                f"{fmt_value(r['top_singular_values'][0] if r['top_singular_values'] else None, '.4g'):>10}")
        if perm:
            p = r.get("permutations") or {}
            line += f" {fmt_value(p.get('heads_mean_similarity')):>9} {fmt_value(p.get('mlp_mean_correlation')):>8}"
        lines.append(line)
    return "\n".join(lines)


def record_rotation(plan: RotationPlan, layer_results: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any],
                    cosines: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Append one ledger row per layer (when a ledger is given), write --spec-out, build the
    table. Returns {"run_id", "layers": merged rows, "global", "ledger", "spec", "table", ...}."""
    merged = merge_results(plan, layer_results, pooled, cosines)
    ledger_file = None
    if plan.ledger:
        from lib.ledgers import append_rows

        ledger_file = str(append_rows(plan.ledger, "rotations", ledger_rows(plan, merged)))
    spec = str(write_transform_spec(plan, merged, pooled)) if plan.spec_out else None
    n_cos = min((r.get("n_cosine_tokens") or 0) for r in merged)
    notes = [f"{plan.n_tokens} paired tokens from {len(plan.pairs)} sample(s)"
             + (f" ({plan.unpaired_student} student / {plan.unpaired_teacher} teacher sample(s) unpaired)"
                if plan.unpaired_student or plan.unpaired_teacher else "")
             + ("; position 0 excluded" if plan.options.exclude_position0 else "; position 0 included"),
             f"cosines after rotation over {n_cos} token(s)" + ("" if n_cos >= plan.n_tokens else
                                                                  f" (every {plan.cosine_stride}th; --cosine-tokens 0 for all)"),
             f"pooled rotation Q → {pooled['rotation_path']}"]
    table = format_rotation_table(merged) + "\n" + "\n".join(notes)
    return {"run_id": plan.run_id, "layers": merged, "global": dict(pooled), "ledger": ledger_file, "spec": spec,
            "table": table, "n_tokens": plan.n_tokens, "n_samples": len(plan.pairs), "output_dir": plan.output_dir}


def run_rotation(student_index: str | os.PathLike, teacher_index: str | os.PathLike, layers: Sequence[str] | None,
                 output_dir: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                 spec_out: str | os.PathLike | None = None, options: RotateOptions = RotateOptions(),
                 run_id: str | None = None) -> dict[str, Any]:
    """The whole rotate job in-process (tests, notebooks, benchmarks): checksums first, then
    plan → per-layer solve → pool → (PCA cosines) → record. Same outputs as the rotate flow."""
    from lib.shards import require_valid

    require_valid([student_index, teacher_index])
    plan = plan_rotation(student_index, teacher_index, layers, output_dir, ledger=ledger, spec_out=spec_out,
                         options=options, run_id=run_id)
    results = [solve_layer(plan, layer) for layer in plan.layers]
    pooled = pool_rotation(plan, results)
    cosines = [pca_cosines(plan, layer) for layer in plan.layers] if plan.pca else []
    return record_rotation(plan, results, pooled, cosines)


# ----------------------------------------------------------------------------------------------
# synthetic captures (tests, benchmarks, demos): a real shard folder from arrays
# ----------------------------------------------------------------------------------------------
@dataclass
class SyntheticSample:
    """One sample for `write_capture_from_arrays`: text, token ids [T], {hook point: [T, d]}."""

    text: str
    input_ids: Any
    acts: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False


def write_capture_from_arrays(out_dir: str | os.PathLike, samples: Sequence[SyntheticSample], *,
                              model: str = "synthetic", tokenizer: str = "synthetic", dtype: str | None = None,
                              first_index: int = 0, token_start: int = 0) -> Path:
    """Write shards + metadata.jsonl exactly as `tourguide capture` lays them out, from arrays
    (numpy or torch; stored in their own dtype unless `dtype` is given). Returns the index path.
    Call it again with `first_index` / `token_start` past the last sample to append in batches."""
    import torch

    from lib.digests import sha256_json, sha256_text
    from lib.shards import INDEX_NAME, LAYER_CONVENTION, commit_shards, make_payload_record, serialize_shard, shard_name

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    start = token_start
    for i, s in enumerate(samples, start=first_index):
        ids = torch.as_tensor(np.asarray(s.input_ids), dtype=torch.int64)
        tensors = {"input_ids": ids}
        for hook, a in s.acts.items():
            t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
            tensors[ACT_PREFIX + hook] = t.to(getattr(torch, dtype)) if dtype else t
        n = int(ids.numel())
        text_sha = sha256_text(s.text)
        key = sha256_json({"model": model, "text": text_sha, "hooks": sorted(s.acts), "i": i})
        stored = dtype or str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        meta = {"sample_id": f"synthetic:{i}", "text": s.text, "text_sha256": text_sha, "model": model,
                "revision": "synthetic", "tokenizer": tokenizer, "dtype": stored, "layer_convention": LAYER_CONVENTION,
                "backend": "synthetic", "capture_key": key, "capture_version": "1", "truncated": str(s.truncated).lower()}
        payload = serialize_shard(tensors, meta)
        rec = make_payload_record(dict(
            shard=shard_name(i), sample_id=f"synthetic:{i}", sample_index=i, text_sha256=text_sha, token_start=start,
            token_end=start + n, n_tokens=n, truncated=s.truncated, layers=list(s.acts), dtype=stored,
            shapes={k: list(v.shape) for k, v in tensors.items()}, model=model, revision="synthetic",
            tokenizer=tokenizer, backend="synthetic", capture_key=key, capture_version="1", logits=False), payload)
        items.append((rec, payload))
        start += n
    commit_shards(out, items)
    return out / INDEX_NAME
