"""What a capture is asked for: `CaptureSpec` (everything that decides the bytes of a
shard, plus run options) and `HookPoint` (a module's output, or its input with ':input').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from lib.core.dtypes import DTYPES
from lib.core.options import Options, PathStr, Seq, one_of
from lib.store.shards import (
    INPUT_SUFFIX,
)

CAPTURE_VERSION = "2"  # bump when shard contents change for the same inputs (2: numerics in the key)


BACKENDS = ("torch", "vllm")


class CaptureSpec(Options):
    """Everything that decides the bytes of a shard (and so its capture key), plus run options.
    Built from the `tourguide capture` flags or the capture flow's parameters; tasks pass it as
    `model_dump(mode="json")`."""

    label = "capture spec"

    model: PathStr = Field(description="HF hub id (already in the HF cache) or a local model folder")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub id")
    dtype: one_of(DTYPES) = Field("float32", description="dtype stored in the shards")
    compute_dtype: one_of(DTYPES) | None = Field(None, description="dtype of the forward pass (default: dtype); "
                                                                   "float32 on CPU for bfloat16 stores")
    device: str = Field("auto", description="cpu, cuda, cuda:1 … (auto: cuda when available)")
    hook_points: Seq[str] = Field((), description="module outputs (or MODULE:input); empty: every decoder block")
    max_length: int | None = Field(None, description="truncate each text to this many tokens")
    logits: bool = Field(True, description="store logits [T, V]")
    batch_size: int = Field(8, description="samples per forward pass (right-padded)")
    backend: one_of(BACKENDS) = Field("torch", description="torch | vllm")
    hf_home: PathStr | None = Field(None, description="HF_HOME to look in for hub models")
    hf_hub_cache: PathStr | None = Field(None, description="HF hub cache folder (overrides hf_home)")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint")
    vllm_options: dict[str, Any] = Field({}, description="vLLM engine options (checked by the vLLM backend)")

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, n: int | None) -> int | None:
        if n is not None and n < 1:
            raise ValueError(f"--max-length must be >= 1 token, got {n}")
        return n

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"--batch-size must be >= 1, got {n}")
        return n


@dataclass(frozen=True)
class HookPoint:
    """`name` as stored (act/<name>); `module` the module it hooks; `kind` 'output' or 'input'."""

    name: str
    module: str
    kind: str

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        if name.endswith(INPUT_SUFFIX):
            return cls(name, name[: -len(INPUT_SUFFIX)], "input")
        return cls(name, name, "output")
