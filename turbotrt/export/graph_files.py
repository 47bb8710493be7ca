"""Reading ONNX files from a bundle as untrusted input (needs `onnx`, not torch).

A graph names the files its weights live in (external-data `location`s); `load_graph` runs the
core's check (`turbotrt.core.onnx_refs`) before the `onnx` package or TensorRT's parser sees the
file: each external tensor must live in the graph's own data file, at an offset and length inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from turbotrt.core.errors import TurbotrtError
from turbotrt.core.onnx_refs import check_external_data


class GraphFileError(TurbotrtError):
    """An ONNX file that points outside its bundle, or whose external data does not add up."""


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def load_graph(path: str | os.PathLike, data_file: str | None = None) -> onnx.ModelProto:
    """The graph at `path`, without external data, after `check_external_data`: every external tensor
    lives in `data_file` (a file name in the same folder; None: the graph may have none) at an offset
    and length that fit in it."""
    path = Path(path)
    check_external_data(path, data_file)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError: a damaged or foreign file
        raise GraphFileError(f"{path} is not a readable ONNX graph ({type(e).__name__}: {e})") from None
