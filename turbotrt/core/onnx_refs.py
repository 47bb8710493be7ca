"""The files an ONNX graph reads besides itself, found without the `onnx` package. Torch-free.

A graph keeps large tensors in external files named by `location` entries. Read from a bundle, a
graph is untrusted: its locations could name any file, in or out of the bundle. ONNX Runtime
refuses locations outside the model's folder, but not another file of the bundle (the tokenizer,
say), and other readers promise nothing. So every reader of a bundle's graph calls
`check_external_data` first: every external tensor must live in the graph's own data file, the one
the manifest declares, at an offset and length inside it.

The walk reads the protobuf wire format directly (field numbers from onnx/onnx.proto), visiting
every place a TensorProto can sit: initializers, sparse initializers, constant attributes (also
in subgraphs and functions) and training graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from turbotrt.core.errors import BundleError

# message -> {field number: message type of that field} for the fields that can lead to a TensorProto
_MODEL = {7: "graph", 20: "training", 25: "function"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_FUNCTION = {7: "node"}
_SPARSE = {1: "tensor", 2: "tensor"}
_TRAINING = {1: "graph", 2: "graph"}
_SCHEMA = {"model": _MODEL, "graph": _GRAPH, "node": _NODE, "attribute": _ATTRIBUTE, "function": _FUNCTION,
           "sparse": _SPARSE, "training": _TRAINING}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_DEPTH = 64


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    location: str | None
    offset: int | None
    length: int | None


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message; value: int, or a memoryview for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise _Malformed("field runs past the end")
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = None, i + 4
        else:
            raise _Malformed(f"wire type {wire}")
        if i > len(buf):
            raise _Malformed("field runs past the end")
        yield field, wire, value


def _tensor(buf: memoryview) -> ExternalTensor | None:
    name, location, offset, length, external = "", None, None, None, False
    for field, wire, value in _fields(buf):
        if field == 8 and wire == 2:
            name = bytes(value).decode("utf-8", "replace")
        elif field == 14 and wire == 0:
            external = value == _EXTERNAL
        elif field == 13 and wire == 2:
            key = val = ""
            for f, w, v in _fields(value):
                if w == 2 and f in (1, 2):
                    text = bytes(v).decode("utf-8", "replace")
                    key, val = (text, val) if f == 1 else (key, text)
            if key == "location":
                location = val
            elif key in ("offset", "length"):
                try:
                    number = int(val)
                except ValueError:
                    raise _Malformed(f"tensor {name!r}: {key} {val!r} is not a number") from None
                offset, length = (number, length) if key == "offset" else (offset, number)
    return ExternalTensor(name, location, offset, length) if external or location is not None else None


def _walk(buf: memoryview, kind: str, out: list, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed("nested too deeply")
    schema = _SCHEMA[kind]
    for field, wire, value in _fields(buf):
        child = schema.get(field)
        if child is None or wire != 2:
            continue
        if child == "tensor":
            t = _tensor(value)
            if t is not None:
                out.append(t)
        else:
            _walk(value, child, out, depth + 1)


def external_tensors(raw: bytes) -> list[ExternalTensor]:
    """Every tensor of a serialized ModelProto that keeps its data in an external file."""
    out: list[ExternalTensor] = []
    try:
        _walk(memoryview(raw), "model", out)
    except _Malformed as e:
        raise BundleError(f"not a readable ONNX graph ({e})") from None
    return out


def check_external_data(graph: str | os.PathLike, data_file: str | None) -> None:
    """Refuse a graph whose external tensors live anywhere but `data_file` (a name beside the graph;
    None: the graph may have none), or outside that file's bytes."""
    graph = Path(graph)
    try:
        raw = graph.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {graph}: {e.strerror}") from None
    try:
        tensors = external_tensors(raw)
    except BundleError as e:
        raise BundleError(f"{graph.name}: {e}") from None
    size = None
    for t in tensors:
        if data_file is None or t.location != data_file:
            raise BundleError(f"{graph.name}: tensor {t.name!r} keeps its data in {t.location!r}, not in the graph's "
                              f"own data file {data_file!r}; refusing to read it (the graph was edited)")
        if size is None:
            data = graph.with_name(data_file)
            if data.is_symlink() or not data.is_file():
                raise BundleError(f"{graph.name}: its data file {data_file} is missing or a symlink")
            size = data.stat().st_size
        offset = t.offset or 0
        if t.length is None or offset < 0 or t.length < 0 or offset + t.length > size:
            raise BundleError(f"{graph.name}: tensor {t.name!r} reads bytes {offset}..{offset + (t.length or 0)} of "
                              f"{data_file} (length {'missing' if t.length is None else t.length}), which has {size} "
                              "bytes: truncated or edited")
