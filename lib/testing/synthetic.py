"""Synthetic captures for tests, benchmarks and demos: a real shard folder from arrays."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.store.shards import ACT_PREFIX


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

    from lib.core.digests import sha256_json, sha256_text
    from lib.store.shards import (
        INDEX_NAME,
        LAYER_CONVENTION,
        commit_shards,
        make_payload_record,
        serialize_shard,
        shard_name,
    )

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


def write_pair_from_arrays(folder: str | os.PathLike, xs: dict[str, Any], ys: dict[str, Any], lens: Sequence[int],
                           rng: np.random.Generator, dtype: str = "float64") -> tuple[Path, Path]:
    """Student and teacher captures of the same samples under `folder`/{student,teacher}: rows of
    xs / ys ({hook point: [sum(lens), d]}) split into samples of `lens` tokens with random token
    ids. Returns the two index paths."""
    s_samples, t_samples, start = [], [], 0
    for i, n in enumerate(lens):
        ids = rng.integers(0, 100, n)
        s_samples.append(SyntheticSample(f"stop {i}", ids, {k: v[start:start + n] for k, v in xs.items()}))
        t_samples.append(SyntheticSample(f"stop {i}", ids, {k: v[start:start + n] for k, v in ys.items()}))
        start += n
    return (write_capture_from_arrays(Path(folder) / "student", s_samples, dtype=dtype),
            write_capture_from_arrays(Path(folder) / "teacher", t_samples, dtype=dtype))
