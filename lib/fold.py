"""Fold a `WeightTransformSet` into a checkpoint: exact, streaming, float64 math, one cast.

For a pre-norm RMSNorm decoder (DESIGN §4), with linear convention y = x Wᵀ + b (W is out×in):

1. untie lm_head from embed_tokens when a rotation needs it (`tie_word_embeddings: false`);
   a signed-permutation Q keeps the tie by permuting the norm gains instead of folding them;
2. fold norm gains into their readers, W ← W·diag(γ), and set γ = 1 (module and eps kept) —
   only when a residual rotation needs it (permutations alone leave gains and ties alone);
3. permute MLP neurons (gate/up rows, down columns) and GQA heads (q/k/v row blocks and their
   biases, o_proj column blocks); rotate V/O per kv head (v rows and bias by Rᵀ, o_proj column
   blocks by R);
4. rotate the residual: readers W ← W·Q, writers W ← Qᵀ·W and b ← Qᵀb, embeddings E ← E·Q.
   Qwen3 q_norm/k_norm are never touched.

Every tensor is transformed on its own (`plan_tensor_ops` says what to do with it,
`apply_tensor_ops` does it in float64 chunks and casts once), so `fold_checkpoint` streams the
checkpoint tensor by tensor and `fold_state_dict` runs the same code on an in-memory state dict.

    from lib.fold import fold_checkpoint
    fold_checkpoint("teacher/", "student/", WeightTransformSet.from_arrays(config, residual_rotation=Q))

or from the command line: `tourguide fold --checkpoint DIR --output-dir DIR --spec transforms.json`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lib.adapters import adapter_for_config
from lib.adapters.base import NORM_KINDS, READER_NORM, WRITERS, ModelAdapter, TensorRole
from lib.checkpoint_io import (DEFAULT_SHARD_BYTES, CheckpointReader, ShardedWriter, TensorEntry, check_output_dir,
                               copy_side_files, st_code, staged_output, write_json)
from lib.errors import BadInputError
from lib.transform_set import WeightTransformSet, is_signed_permutation

FOLD_VERSION = "1"
REPORT_NAME = "fold_report.json"
FAILED_MARKER = "FOLD_FAILED"
CHUNK_BYTES = 16 << 20  # float64 rows per chunk: bounds peak memory on huge tensors, still a fast GEMM


@dataclass(frozen=True)
class FoldOptions:
    """How to write the fold. The last three switches exist for negative controls in tests
    (each reproduces a known fold bug the equivalence gate must catch); the CLI never sets them."""

    dtype: str | None = None  # None: every tensor keeps its stored dtype
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    chunk_bytes: int = CHUNK_BYTES
    device: str = "cpu"  # where the float64 chunk math runs: cpu | cuda | auto (cuda when present)
    fold_gains: bool = True
    untie: bool = True
    permute_qkv_bias: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FoldOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def plan_layout(transforms: WeightTransformSet, adapter: ModelAdapter, options: FoldOptions = FoldOptions()) -> FoldLayout:
    """Untie / fold / permute the gains? Only a residual rotation touches gains and the tie; a
    signed-permutation Q on a tied model keeps the tie by permuting the gains (exact)."""
    tied = adapter.tied_embeddings
    if not transforms.has_rotation:
        return FoldLayout(tied, untie=False, fold_gains=False, permute_gains=False)
    signed = (tied and transforms.exact and transforms.residual_rotation is not None
              and is_signed_permutation(transforms.residual_rotation))
    if signed:
        return FoldLayout(tied, untie=False, fold_gains=False, permute_gains=True)
    return FoldLayout(tied, untie=tied and options.untie, fold_gains=options.fold_gains, permute_gains=False)


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
                    gains: Mapping[str, np.ndarray], options: FoldOptions = FoldOptions()) -> TensorOps:
    """The TensorOps of one checkpoint tensor. `gains` maps norm tensor names to their γ [d]
    (float64; needed only when gains are folded)."""
    kind, part, i = role.kind, role.part, role.layer
    name = role.name
    if kind in ("q_norm", "k_norm"):
        return TensorOps(name, name)  # per-head gains: never touched (DESIGN §4.4)
    if kind in NORM_KINDS:
        q = transforms.head_rotation() if kind == "final_norm" else transforms.block_rotation(i)
        if q is None:
            return TensorOps(name, name)
        if layout.fold_gains:
            return TensorOps(name, name, fill_ones=True)
        if layout.permute_gains:
            return TensorOps(name, name, orient="vec_residual", rotation=np.abs(q))
        return TensorOps(name, name)  # negative control: rotation without the gain fold
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
    if part == "bias" and kind in ("q", "k", "v") and not options.permute_qkv_bias:
        gather = None  # negative control: a head permutation that forgets the biases
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


def apply_tensor_ops(src, ops: TensorOps, out_dtype=None, chunk_bytes: int = CHUNK_BYTES, device: str = "cpu"):
    """Apply `ops` to CPU torch tensor `src` (any float dtype) in float64, chunked along the
    internal axis, and cast once to `out_dtype` (default: src.dtype). Returns a new CPU tensor of
    src's shape. `device` runs the float64 chunk math there (e.g. 'cuda'; the result comes back)."""
    import torch

    out_dtype = out_dtype or src.dtype
    if ops.is_identity:
        return src if src.dtype == out_dtype else src.to(out_dtype)
    if ops.fill_ones:
        return torch.ones(src.shape, dtype=out_dtype)
    if ops.blocks is None and ops.scale is None and ops.rotation is None:
        # A pure permutation moves values without arithmetic: exact in the stored dtype, and
        # I/O-bound instead of paying two float64 conversions.
        dim = 1 if ops.orient == "cols" else 0
        return src.index_select(dim, torch.from_numpy(ops.gather)).to(out_dtype)
    out = torch.empty(src.shape, dtype=out_dtype)
    view = {"rows": lambda t: t, "cols": lambda t: t.T, "vec_internal": lambda t: t[:, None],
            "vec_residual": lambda t: t[None, :]}[ops.orient]
    x, y = view(src), view(out)
    m, n = x.shape
    bs = ops.blocks.shape[1] if ops.blocks is not None else 1
    step = max(bs, (chunk_bytes // max(1, 8 * n)) // bs * bs)
    dev = torch.device(device)

    def f64(arr: np.ndarray | None):
        return None if arr is None else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(dev)

    gather = torch.from_numpy(ops.gather) if ops.gather is not None else None
    blocks, scale, rot = f64(ops.blocks), f64(ops.scale), f64(ops.rotation)
    for a in range(0, m, step):
        b = min(m, a + step)
        # Always a fresh float64 tensor (never a view of src: the in-place scale below must not
        # write into the caller's tensor when src is already float64).
        c = (x[gather[a:b]] if gather is not None else x[a:b]).to(dev, torch.float64, copy=True)
        if blocks is not None:
            c = torch.bmm(blocks[a // bs:b // bs], c.reshape(-1, bs, n)).reshape(-1, n)
        if scale is not None:
            c.mul_(scale)
        if rot is not None:
            c = c @ rot
        y[a:b] = c.to(out_dtype).cpu()  # the one cast (on the device), then back to host memory
    return out


def _roles(names: list[str], adapter: ModelAdapter, transforms: WeightTransformSet) -> dict[str, TensorRole | None]:
    roles = {n: adapter.classify(n) for n in names}
    unknown = [n for n, r in roles.items() if r is None and not adapter.is_passthrough(n)]
    if unknown and not transforms.is_identity:
        raise BadInputError(
            f"checkpoint tensor(s) {unknown[:5]} are not known to the {adapter.model_type} adapter, so the fold cannot "
            "tell whether they read or write the residual stream; teach lib/adapters/ about them")
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


def _math_device(options: FoldOptions) -> str:
    from lib.models import pick_device

    device = pick_device(options.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BadInputError(f"--fold-device {options.device}: no CUDA device is visible here; use cpu")
    return device


def _out_dtype(src_dtype, options: FoldOptions):
    if options.dtype is None or not src_dtype.is_floating_point:
        return src_dtype
    from lib.models import torch_dtype

    return torch_dtype(options.dtype)


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


# ----------------------------------------------------------------------------------------------
# in memory
# ----------------------------------------------------------------------------------------------
def fold_state_dict(state_dict: Mapping[str, Any], config: Any, transforms: WeightTransformSet,
                    options: FoldOptions = FoldOptions()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fold on an in-memory state dict (name -> torch tensor). Returns (new state dict, new
    config dict). Same per-tensor code as `fold_checkpoint`; handy for tests and small models."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    adapter = adapter_for_config(cfg)
    adapter.check_supported()
    layout = plan_layout(transforms, adapter, options)
    names = list(state_dict)
    check_checkpoint_shapes({n: tuple(t.shape) for n, t in state_dict.items()}, adapter)
    roles = _roles(names, adapter, transforms)
    gains = norm_gains(lambda n: state_dict[n], names, roles) if layout.fold_gains else {}
    out = {}
    for name in _output_names(names, adapter, layout):
        role = roles.get(name) or adapter.classify(name)
        if role is None:
            out[name] = state_dict[name]
            continue
        ops = plan_tensor_ops(role, transforms, adapter, layout, gains, options)
        src = state_dict[ops.source]
        out[name] = apply_tensor_ops(src, ops, _out_dtype(src.dtype, options), options.chunk_bytes,
                                     _math_device(options))
    return out, output_config(cfg, layout, options)


# ----------------------------------------------------------------------------------------------
# streaming, on disk
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldResult:
    """What `fold_checkpoint` wrote (JSON-able via `to_dict`)."""

    source_dir: str
    output_dir: str
    exact: bool
    untied: bool
    gains_folded: bool
    gains_permuted: bool
    n_tensors: int
    n_transformed: int
    bytes_written: int
    shards: list[str]
    side_files: list[str]
    seconds: float
    transforms: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fold_checkpoint(source_dir: str | os.PathLike, output_dir: str | os.PathLike, transforms: WeightTransformSet,
                    options: FoldOptions = FoldOptions(), report_extra: Mapping[str, Any] | None = None) -> FoldResult:
    """Apply `transforms` to the safetensors checkpoint in `source_dir` and write the result to
    `output_dir` (sharded safetensors + index, config.json, generation_config.json, every side
    file byte for byte, and a `fold_report.json` with status 'unverified' until the gate runs).

    Streams tensor by tensor: peak memory is about one tensor in its stored dtype twice plus a
    bounded float64 chunk. Validates (output path, config, tensor shapes) before writing anything;
    the output appears only complete (temp folder + rename)."""
    t0 = time.perf_counter()
    reader = CheckpointReader(source_dir)
    out_path = check_output_dir(reader.folder, output_dir, options.overwrite)
    cfg = reader.config()
    adapter = adapter_for_config(cfg)
    adapter.check_supported()
    _check_same_shape_config(transforms.adapter, adapter, reader.folder)
    check_checkpoint_shapes({n: e.shape for n, e in reader.entries.items()}, adapter)
    if options.dtype is not None:
        from lib.models import torch_dtype

        torch_dtype(options.dtype)  # raises a clear error for a bad --dtype
    layout = plan_layout(transforms, adapter, options)
    names = reader.names
    roles = _roles(names, adapter, transforms)
    gains = norm_gains(reader.read, names, roles) if layout.fold_gains else {}

    plans: list[tuple[TensorEntry, TensorOps | None]] = []
    for name in _output_names(names, adapter, layout):
        role = roles.get(name) or adapter.classify(name)
        ops = plan_tensor_ops(role, transforms, adapter, layout, gains, options) if role is not None else None
        src_entry = reader.entries[ops.source if ops is not None else name]
        dtype = src_entry.dtype
        if options.dtype is not None and dtype in ("F64", "F32", "F16", "BF16"):
            from lib.models import torch_dtype

            dtype = st_code(torch_dtype(options.dtype))
        plans.append((TensorEntry(name, dtype, src_entry.shape), ops))

    from lib.checkpoint_io import torch_dtype_of

    device = _math_device(options)
    n_transformed = 0
    with staged_output(out_path, options.overwrite) as tmp:
        writer = ShardedWriter(tmp, [e for e, _ in plans], options.max_shard_bytes,
                               metadata={"tourguide_fold": FOLD_VERSION})
        try:
            for entry, ops in plans:
                source = ops.source if ops is not None else entry.name
                if (ops is None or ops.is_identity) and reader.entries[source].dtype == entry.dtype:
                    writer.copy_raw(entry.name, reader, source)  # unchanged bytes: kernel copy
                    continue
                src = reader.read(source)
                if ops is None or ops.is_identity:
                    t = src.to(torch_dtype_of(entry.dtype))
                else:
                    t = apply_tensor_ops(src, ops, torch_dtype_of(entry.dtype), options.chunk_bytes, device)
                    n_transformed += 1
                writer.write(entry.name, t)
                del src, t
            writer.close()
        except BaseException:
            writer.abort()
            raise
        side = copy_side_files(reader.folder, tmp)
        write_json(tmp / "config.json", output_config(cfg, layout, options))
        if "generation_config.json" not in side:
            write_json(tmp / "generation_config.json", _generation_config(cfg))
            side.append("generation_config.json")
        result = FoldResult(
            source_dir=str(reader.folder.resolve()), output_dir=str(out_path), exact=transforms.exact,
            untied=layout.untie, gains_folded=layout.fold_gains, gains_permuted=layout.permute_gains,
            n_tensors=len(plans), n_transformed=n_transformed, bytes_written=sum(e.nbytes for e, _ in plans),
            shards=list(writer.files), side_files=side, seconds=round(time.perf_counter() - t0, 3),
            transforms=transforms.summary(), options=options.to_dict())
        write_json(tmp / REPORT_NAME, {"status": "unverified", "fold": result.to_dict(), **(report_extra or {})})
    return result


def _check_same_shape_config(a: ModelAdapter, b: ModelAdapter, folder: Path) -> None:
    keys = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    diff = [k for k in keys if getattr(a, k) != getattr(b, k)]
    if diff:
        raise BadInputError(f"{folder}/config.json: the transforms were validated for another config "
                            f"({', '.join(f'{k}: {getattr(a, k)} vs {getattr(b, k)}' for k in diff)}); rebuild them for this checkpoint")


def _generation_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal generation_config.json when the source has none (token ids from config.json)."""
    out: dict[str, Any] = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(k) is not None:
            out[k] = cfg[k]
    if cfg.get("transformers_version"):
        out["transformers_version"] = cfg["transformers_version"]
    return out


def fold_from_spec(source_dir: str | os.PathLike, output_dir: str | os.PathLike, spec_path: str | os.PathLike,
                   options: FoldOptions = FoldOptions(), allow_inexact: bool = False,
                   allow_outside_paths: bool = False) -> FoldResult:
    """Validate `spec_path` against the checkpoint's config, then `fold_checkpoint`."""
    reader = CheckpointReader(source_dir)
    check_output_dir(reader.folder, output_dir, options.overwrite)
    ts = WeightTransformSet.from_spec(spec_path, reader.config(), allow_inexact=allow_inexact,
                                      allow_outside_paths=allow_outside_paths)
    return fold_checkpoint(reader.folder, output_dir, ts, options)


def read_report(output_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(output_dir) / REPORT_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def prepare_fold(checkpoint: str, spec_path: str | os.PathLike, output_dir: str | os.PathLike,
                 options: FoldOptions = FoldOptions(), *, allow_inexact: bool = False,
                 allow_outside_paths: bool = False, revision: str | None = None, hf_home: str | None = None,
                 hf_hub_cache: str | None = None) -> dict[str, Any]:
    """Every check of a fold, writing nothing: resolve the checkpoint (local folder or cached hub
    id; clear offline error), check the output path, the config and tensor shapes, parse and
    validate the spec. Returns a small JSON-able manifest for the later stages."""
    from lib.models import resolve_model

    ref = resolve_model(checkpoint, revision=revision, hf_home=hf_home, hf_hub_cache=hf_hub_cache)
    reader = CheckpointReader(ref.local_dir)
    out = check_output_dir(reader.folder, output_dir, options.overwrite)
    cfg = reader.config()
    adapter = adapter_for_config(cfg)
    adapter.check_supported()
    check_checkpoint_shapes({n: e.shape for n, e in reader.entries.items()}, adapter)
    if options.dtype is not None:
        from lib.models import torch_dtype

        torch_dtype(options.dtype)
    _math_device(options)
    ts = WeightTransformSet.from_spec(spec_path, cfg, allow_inexact=allow_inexact,
                                      allow_outside_paths=allow_outside_paths)
    layout = plan_layout(ts, adapter, options)
    return {"checkpoint": checkpoint, "source_dir": str(reader.folder), "revision": ref.revision,
            "output_dir": str(out), "spec": str(Path(spec_path).resolve()), "spec_digest": ts.spec_digest,
            "exact": ts.exact, "inexact_reasons": list(ts.inexact_reasons), "transforms": ts.summary(),
            "untie": layout.untie, "fold_gains": layout.fold_gains, "permute_gains": layout.permute_gains,
            "n_tensors": len(reader.entries), "bytes": reader.total_bytes}
