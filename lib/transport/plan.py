"""Transports between a student's and a teacher's captured activations (no Prefect here).

    tourguide rotate --student-index runs/x/activations/student/metadata.jsonl \
                     --teacher-index runs/x/activations/teacher/metadata.jsonl \
                     --layer model.layers.0 --layer model.layers.1 \
                     --ledger runs/x/rotations.jsonl --output-dir runs/x/rotations \
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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.errors import BadInputError
from lib.core.options import Frozen
from lib.store.runs import new_run_id
from lib.store.safetensors_io import read_tensors
from lib.store.shards import ACT_PREFIX, INPUT_SUFFIX, ShardRecord, read_index, resolve_index_path
from lib.store.staging import check_output_dir
from lib.transport.files import GLOBAL_NAME
from lib.transport.options import RotateOptions
from lib.transport.stream import RowSpan


class PairedSample(Frozen):
    """One sample present in both captures: rows [start, stop) of each shard are paired."""

    sample_id: str
    text_sha256: str
    student_shard: str  # absolute paths
    teacher_shard: str
    start: int
    stop: int


class PermutationLayer(Frozen):
    """Where the permutation inputs of one decoder block live and how its heads group."""

    layer: str
    mlp_hook: str  # e.g. model.layers.3.mlp.down_proj:input   [T, intermediate_size]
    heads_hook: str  # e.g. model.layers.3.self_attn.o_proj:input  [T, H * head_dim]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


class RotationPlan(Frozen):
    """Everything the per-layer work needs. Tasks pass it as `model_dump(mode="json")` and
    rebuild it with `RotationPlan.model_validate`."""

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


def check_output_paths(output_dir: str | os.PathLike, ledger: str | os.PathLike | None,
                       spec_out: str | os.PathLike | None) -> None:
    check_output_dir(output_dir)
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
    return read_tensors(path, ["input_ids"])["input_ids"]


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
    from lib.models.loading import read_config, resolve_model

    try:
        return dict(read_config(resolve_model(ref)))
    except Exception as exc:
        raise BadInputError(f"cannot read the model config of {ref!r} ({str(exc)[:160]}); --solve-permutations needs "
                            "heads / kv heads / head_dim: pass --model-config path/to/config.json") from None


def _plan_permutations(layers: Sequence[str], config_ref: str, s_index: Path, t_index: Path,
                       s_rows: Sequence[ShardRecord], t_rows: Sequence[ShardRecord]) -> tuple[tuple[PermutationLayer, ...], str, int]:
    from lib.models.adapters import adapter_for_config

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
        out.append(PermutationLayer(layer=layer, mlp_hook=mlp, heads_hook=heads, num_heads=adapter.num_heads,
                                    num_kv_heads=adapter.num_kv_heads, head_dim=adapter.head_dim,
                                    intermediate_size=adapter.intermediate_size))
    return tuple(out), adapter.model_type, adapter.head_dim


def plan_rotation(student_index: str | os.PathLike, teacher_index: str | os.PathLike, layers: Sequence[str] | None,
                  output_dir: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                  spec_out: str | os.PathLike | None = None, options: RotateOptions = RotateOptions(),
                  run_id: str | None = None, check_tokens: bool = True) -> RotationPlan:
    """Validate the inputs and pair the tokens; writes nothing. Raises BadInputError naming the
    file / line / sample / layer for every problem (see the module docstring).

    check_tokens=False skips opening the shards (the CLI's fast pre-check before Prefect starts).
    """
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
        config_ref = options.config_ref or s_pair[0].model
        perms, model_type, head_dim = _plan_permutations(layers, config_ref, s_index, t_index, s_pair, t_pair)
    elif options.config_ref:
        from lib.models.adapters import adapter_for_config

        adapter = adapter_for_config(load_model_config(options.config_ref))
        model_type, head_dim = adapter.model_type, adapter.head_dim

    start = 1 if options.exclude_position0 else 0
    pairs = []
    for s, t in zip(s_pair, t_pair, strict=True):
        n = _pair_tokens(s_index.parent, t_index.parent, s, t) if check_tokens else min(s.n_tokens, t.n_tokens)
        pairs.append(PairedSample(sample_id=s.sample_id, text_sha256=s.text_sha256,
                                  student_shard=str((s_index.parent / s.shard).resolve()),
                                  teacher_shard=str((t_index.parent / t.shard).resolve()), start=start, stop=max(n, start)))
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
        run_id=run_id or new_run_id("rotate"), options=options, pairs=tuple(pairs), d_student=d_s, d_teacher=d_t,
        n_tokens=n_tokens, cosine_stride=stride, weights=weights, unpaired_student=len(s_by) - len(common),
        unpaired_teacher=len(t_by) - len(common), model_type=model_type, head_dim=head_dim, permutations=perms,
        tokens_checked=check_tokens)
