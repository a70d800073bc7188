"""Fold a `WeightTransformSet` into a checkpoint: exact, streaming, float64 math, one cast.

For a pre-norm RMSNorm decoder (Llama, Qwen2, Qwen3), with linear convention y = x Wᵀ + b (W is out×in):

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
from pathlib import Path
from typing import Any

from lib.core.dtypes import st_code
from lib.core.errors import BadInputError
from lib.core.options import Frozen
from lib.fold.apply import _math_device, _out_dtype, apply_tensor_ops, streams_rows, tensor_op_chunks
from lib.fold.checkpoint_io import CheckpointReader, ShardedWriter, TensorEntry, copy_side_files
from lib.fold.options import FoldOptions
from lib.fold.plan import (
    TensorOps,
    _output_names,
    _roles,
    check_checkpoint_shapes,
    norm_gains,
    output_config,
    plan_layout,
    plan_tensor_ops,
)
from lib.fold.transform_set import WeightTransformSet
from lib.fold.write_behind import WriteBehind
from lib.models.adapters import adapter_for_config
from lib.models.adapters.base import ModelAdapter
from lib.store.atomic import write_json
from lib.store.staging import check_output_dir, staged_output

FOLD_VERSION = "1"

# queued output bytes the write-behind may hold, in fold chunks: enough to keep the disk busy
# while the next chunks compute, small next to the one tensor in memory
WRITE_BEHIND_CHUNKS = 4


REPORT_NAME = "fold_report.json"


FAILED_MARKER = "FOLD_FAILED"


def fold_state_dict(state_dict: Mapping[str, Any], config: Any, transforms: WeightTransformSet,
                    options: FoldOptions = FoldOptions()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fold on an in-memory state dict (name -> torch tensor). Returns (new state dict, new
    config dict). Same per-tensor code as `fold_checkpoint`; handy for tests and small models."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    adapter = adapter_for_config(cfg)
    adapter.check_supported()
    layout = plan_layout(transforms, adapter)
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
        ops = plan_tensor_ops(role, transforms, adapter, layout, gains)
        src = state_dict[ops.source]
        out[name] = apply_tensor_ops(src, ops, _out_dtype(src.dtype, options), options.chunk_bytes,
                                     _math_device(options))
    return out, output_config(cfg, layout, options)


class FoldResult(Frozen):
    """What `fold_checkpoint` wrote (JSON-able: `model_dump(mode="json")`)."""

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
    transforms: dict[str, Any] = {}
    options: dict[str, Any] = {}


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
    out_path = check_output_dir(output_dir, source=reader.folder, allow_nonempty=options.overwrite)
    cfg = reader.config()
    adapter = adapter_for_config(cfg)
    adapter.check_supported()
    _check_same_shape_config(transforms.adapter, adapter, reader.folder)
    check_checkpoint_shapes({n: e.shape for n, e in reader.entries.items()}, adapter)
    if options.dtype is not None:
        from lib.core.dtypes import torch_dtype

        torch_dtype(options.dtype)  # raises a clear error for a bad --dtype
    layout = plan_layout(transforms, adapter)
    names = reader.names
    roles = _roles(names, adapter, transforms)
    gains = norm_gains(reader.read, names, roles) if layout.fold_gains else {}

    plans: list[tuple[TensorEntry, TensorOps | None]] = []
    for name in _output_names(names, adapter, layout):
        role = roles.get(name) or adapter.classify(name)
        ops = plan_tensor_ops(role, transforms, adapter, layout, gains) if role is not None else None
        src_entry = reader.entries[ops.source if ops is not None else name]
        dtype = src_entry.dtype
        if options.dtype is not None and dtype in ("F64", "F32", "F16", "BF16"):
            from lib.core.dtypes import torch_dtype

            dtype = st_code(torch_dtype(options.dtype))
        plans.append((TensorEntry(name, dtype, src_entry.shape), ops))

    from lib.core.dtypes import torch_dtype_of

    device = _math_device(options)
    n_transformed = 0
    with staged_output(out_path, options.overwrite) as tmp:
        # Writes run behind the math (lib.fold.write_behind); a tensor whose result comes out in
        # its own row order is written chunk by chunk and never exists whole in memory.
        writer = WriteBehind(ShardedWriter(tmp, [e for e, _ in plans], options.max_shard_bytes,
                                           metadata={"tourguide_fold": FOLD_VERSION}),
                             max_bytes=WRITE_BEHIND_CHUNKS * options.chunk_bytes)
        try:
            for entry, ops in plans:
                source = ops.source if ops is not None else entry.name
                if (ops is None or ops.is_identity) and reader.entries[source].dtype == entry.dtype:
                    writer.copy_raw(entry.name, reader, source)  # unchanged bytes: kernel copy
                    continue
                src = reader.read(source)
                out_dtype = torch_dtype_of(entry.dtype)
                if ops is None or ops.is_identity:
                    writer.write(entry.name, src.to(out_dtype))
                elif streams_rows(ops):
                    writer.begin(entry.name)
                    for _, _, rows in tensor_op_chunks(src, ops, out_dtype, options.chunk_bytes, device):
                        writer.write_part(rows)
                    n_transformed += 1
                else:
                    writer.write(entry.name, apply_tensor_ops(src, ops, out_dtype, options.chunk_bytes, device))
                    n_transformed += 1
                del src
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
            transforms=transforms.summary(), options=options.model_dump(mode="json"))
        write_json(tmp / REPORT_NAME, {"status": "unverified", "fold": result.model_dump(mode="json"), **(report_extra or {})})
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
    check_output_dir(output_dir, source=reader.folder, allow_nonempty=options.overwrite)
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
    from lib.models.loading import resolve_model

    ref = resolve_model(checkpoint, revision=revision, hf_home=hf_home, hf_hub_cache=hf_hub_cache)
    reader = CheckpointReader(ref.local_dir)
    out = check_output_dir(output_dir, source=reader.folder, allow_nonempty=options.overwrite)
    cfg = reader.config()
    adapter = adapter_for_config(cfg)
    adapter.check_supported()
    check_checkpoint_shapes({n: e.shape for n, e in reader.entries.items()}, adapter)
    if options.dtype is not None:
        from lib.core.dtypes import torch_dtype

        torch_dtype(options.dtype)
    _math_device(options)
    ts = WeightTransformSet.from_spec(spec_path, cfg, allow_inexact=allow_inexact,
                                      allow_outside_paths=allow_outside_paths)
    layout = plan_layout(ts, adapter)
    return {"checkpoint": checkpoint, "source_dir": str(reader.folder), "revision": ref.revision,
            "output_dir": str(out), "spec": str(Path(spec_path).resolve()), "spec_digest": ts.spec_digest,
            "exact": ts.exact, "inexact_reasons": list(ts.inexact_reasons), "transforms": ts.summary(),
            "untie": layout.untie, "fold_gains": layout.fold_gains, "permute_gains": layout.permute_gains,
            "n_tensors": len(reader.entries), "bytes": reader.total_bytes}
