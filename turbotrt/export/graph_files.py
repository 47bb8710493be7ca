"""Reading ONNX files from a bundle as untrusted input (needs `onnx`, not torch).

A graph names the files its weights live in (external-data `location`s). ONNX Runtime (>= 1.20)
refuses locations outside the model's folder; TensorRT's parser and the `onnx` package do not
promise to, so every turbotrt command that hands a bundle's graph to them checks it here first:
each external tensor must live in the graph's own data file (the one the manifest declares), at
an offset and length inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from turbotrt.core.errors import TurbotrtError


class GraphFileError(TurbotrtError):
    """An ONNX file that points outside its bundle, or whose external data does not add up."""


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto of a model: initializers and constant attributes, functions and subgraphs too."""
    def graph_tensors(g):
        yield from g.initializer
        for node in g.node:
            yield from node_tensors(node)

    def node_tensors(node):
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from graph_tensors(a.g)
            for sub in a.graphs:
                yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)
    for f in model.functions:
        for node in f.node:
            yield from node_tensors(node)


def load_graph(path: str | os.PathLike, data_file: str | None = None) -> onnx.ModelProto:
    """The graph at `path`, without external data, after checking that every external tensor lives in
    `data_file` (a file name in the same folder; None: the graph may have no external tensors) at a
    declared offset and length that fit in it."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError: a damaged or foreign file
        raise GraphFileError(f"{path} is not a readable ONNX graph ({type(e).__name__}: {e})") from None
    size = None
    for t in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = external_info(t)
        loc = info.get("location")
        if data_file is None or loc != data_file:
            raise GraphFileError(f"{path.name}: tensor {t.name!r} keeps its data in {loc!r}, not in the graph's own "
                                 f"data file {data_file!r}; refusing to read it (the graph was edited)")
        if size is None:
            data = path.with_name(data_file)
            if data.is_symlink() or not data.is_file():
                raise GraphFileError(f"{path.name}: its data file {data_file} is missing or a symlink")
            size = data.stat().st_size
        try:
            offset, length = int(info.get("offset", "0")), int(info["length"])
        except (KeyError, ValueError):
            raise GraphFileError(f"{path.name}: tensor {t.name!r} has no valid offset/length for its external "
                                 "data") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise GraphFileError(f"{path.name}: tensor {t.name!r} reads bytes {offset}..{offset + length} of "
                                 f"{data_file}, which has {size} (truncated or edited)")
    return model


