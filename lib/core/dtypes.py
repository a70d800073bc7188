"""The one table of dtypes: names, torch dtypes, safetensors codes and item sizes.

Every module that names a dtype (capture, checkpoints, shards, configs) asks this one; torch is
imported lazily so that config parsing stays import-light.
"""

from __future__ import annotations

from typing import Any

from lib.core.errors import ModelLoadError

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ModelLoadError(f"--dtype {name!r} is not one of {list(DTYPES)}") from None


# safetensors dtype codes <-> torch dtypes (names so that this module imports without torch).
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}


def torch_dtype_of(code: str):
    import torch

    return getattr(torch, ST_DTYPES[code])


def st_code(dtype: Any) -> str:
    """safetensors dtype code of a torch dtype ('F32', 'BF16', ...)."""
    return TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def numpy_dtype_of(code: str):
    """The little-endian numpy dtype of a safetensors code, or None where numpy has none (BF16, F8)."""
    import numpy as np

    try:
        return np.dtype(ST_DTYPES[code]).newbyteorder("<")
    except TypeError:  # 'bfloat16', 'float8_*': not numpy types
        return None
