"""torch dtypes by precision name (`fp32`) or numpy name (`float32`): the one table on the torch side."""

from __future__ import annotations

import torch

from turbotrt.core.precision import NUMPY_DTYPE

TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BY_NUMPY_NAME = {NUMPY_DTYPE[k]: v for k, v in TORCH_DTYPE.items()} | {
    "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`fp32`/`fp16`/`bf16` or a numpy dtype name -> torch dtype (a torch dtype is returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return TORCH_DTYPE.get(name) or _BY_NUMPY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join([*TORCH_DTYPE, *_BY_NUMPY_NAME])}") from None
