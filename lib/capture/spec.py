"""What a capture is asked for: `CaptureSpec` (everything that decides the bytes of a
shard, plus run options) and `HookPoint` (a module's output, or its input with ':input').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lib.core.dtypes import DTYPES
from lib.core.errors import BadInputError
from lib.store.shards import (
    INPUT_SUFFIX,
)

CAPTURE_VERSION = "2"  # bump when shard contents change for the same inputs (2: numerics in the key)


BACKENDS = ("torch", "vllm")


@dataclass(frozen=True)
class CaptureSpec:
    """Everything that decides the bytes of a shard (and so its capture key), plus run options."""

    model: str
    revision: str | None = None
    dtype: str = "float32"  # stored dtype
    compute_dtype: str | None = None  # None = same as dtype; 'float32' on CPU for bf16 stores
    device: str = "auto"
    hook_points: tuple[str, ...] = ()  # () = every decoder block
    max_length: int | None = None
    logits: bool = True
    batch_size: int = 8
    backend: str = "torch"
    hf_home: str | None = None
    hf_hub_cache: str | None = None
    trust_remote_code: bool = False
    vllm_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise BadInputError(f"--dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise BadInputError(f"--compute-dtype {self.compute_dtype!r} is not one of {list(DTYPES)}")
        if self.max_length is not None and self.max_length < 1:
            raise BadInputError(f"--max-length must be >= 1 token, got {self.max_length}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.backend not in BACKENDS:
            raise BadInputError(f"--backend {self.backend!r} is not one of {list(BACKENDS)}")


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
