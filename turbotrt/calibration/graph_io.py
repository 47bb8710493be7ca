"""Read initializers of an exported graph (external data included) and write a graph back with its
large tensors streamed into one page-aligned external-data file, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import onnx
import torch
from onnx import TensorProto

from turbotrt.export.onnx_graph import ONNX_OF, TORCH_OF, ExternalDataWriter

INLINE_MAX_BYTES = 1024  # scales and zero points stay in the graph; weights go to the data file


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def raw_bytes(t: TensorProto, base_dir: Path) -> bytes:
    """The little-endian bytes of one initializer, wherever they are stored."""
    if t.data_location == TensorProto.EXTERNAL:
        info = _external_info(t)
        with open(base_dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return f.read(int(length)) if length is not None else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()


def to_torch(t: TensorProto, base_dir: Path) -> torch.Tensor:
    dtype = TORCH_OF.get(t.data_type)
    if dtype is None:
        raise ValueError(f"initializer {t.name}: unsupported ONNX type {t.data_type}")
    buf = bytearray(raw_bytes(t, base_dir))
    return torch.frombuffer(buf, dtype=dtype).reshape(tuple(t.dims)) if buf else torch.empty(tuple(t.dims), dtype=dtype)


def read_initializers(model: onnx.ModelProto, base_dir: str | os.PathLike, names: Iterable[str] | None = None) -> dict:
    """name -> torch tensor (stored dtype) for the named initializers (all when names is None)."""
    base_dir = Path(base_dir)
    wanted = None if names is None else set(names)
    return {t.name: to_torch(t, base_dir) for t in model.graph.initializer if wanted is None or t.name in wanted}


def tensor_proto(name: str, value: torch.Tensor) -> TensorProto:
    """An inline initializer with raw little-endian bytes (moved to external data if large)."""
    value = value.detach().contiguous()
    tp = TensorProto(name=name, data_type=ONNX_OF[value.dtype], dims=list(value.shape))
    tp.raw_data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return tp


def save_model(model: onnx.ModelProto, path: str | os.PathLike, source_dir: str | os.PathLike,
               progress: Callable | None = None) -> Path:
    """Write `path` and `path + '.data'`; both appear under their final names only when complete.

    Initializers already external (relative to `source_dir`) are copied tensor by tensor; inline
    ones above INLINE_MAX_BYTES are moved out. Offsets are page-aligned so runtimes may mmap them.
    """
    source_dir = Path(source_dir)
    inits = list(model.graph.initializer)
    with ExternalDataWriter(path) as out:
        for t in (progress(inits, desc="writing weights") if progress else inits):
            if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) <= INLINE_MAX_BYTES:
                continue
            out.append(t, raw_bytes(t, source_dir))
        return out.commit(model)


def float_state_dict(path: str | os.PathLike, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named weights of an exported graph as fp32 (its initializers carry checkpoint keys)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = list(names)
    found = read_initializers(model, path.parent, names)
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"{path.name} lacks initializers {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                       "not an export of this model?")
    return {n: found[n].float() for n in names}


__all__ = ["read_initializers", "to_torch", "raw_bytes", "tensor_proto", "save_model", "float_state_dict"]
