"""ONNX files in and out: trace on `meta`, stream weights to external data, read initializers back.

Tracing on `meta` costs no weight memory whatever the model size; weights then go from the
(mmap'd) checkpoint to disk one tensor at a time, so peak memory stays near one tensor plus the
traced graph. Files are written under temporary names and renamed only when complete.

Reading is the mirror image and treats the file as untrusted: every external-data location must be
the graph's own data file (declared by the manifest), with an offset and length inside it, before
a byte is read. One type table (`TORCH_OF`) serves every reader and writer.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import onnx
import torch
from onnx import TensorProto

from turbotrt.export.graph_files import GraphFileError, external_info, load_graph

OPSET = 20  # TensorRT 10.x's ONNX parser reads opsets 9..20 (onnx-tensorrt's operator support notes)
ALIGN = 4096  # external-data offsets aligned to pages so runtimes may mmap them

TORCH_OF = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, onnx.TensorProto.DOUBLE: torch.float64,
}
ONNX_OF = {t: o for o, t in TORCH_OF.items()}


@dataclass(frozen=True)
class WeightSlot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class TracedGraph:
    model: onnx.ModelProto  # no initializer data yet
    weights: list[WeightSlot]  # what the graph needs, in graph order


def trace(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
          opset: int = OPSET) -> TracedGraph:
    """Export with torch's dynamo exporter; initializers are declared, not filled."""
    import onnx_ir

    with warnings.catch_warnings(), torch.no_grad(), _quiet("torch.onnx", "onnx_ir"):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module.eval(), args, dynamo=True, input_names=input_names,
                                 output_names=output_names, opset_version=opset, optimize=False, verbose=False)
        g = prog.model.graph
        slots = []
        for name, value in g.initializers.items():
            slots.append(WeightSlot(name, _torch_dtype(value.dtype), tuple(int(d) for d in value.shape)))
            value.const_value = None  # declared here, filled by write_model
        _fold_constants(prog.model)
        return TracedGraph(onnx_ir.serde.serialize_model(prog.model), slots)


def _fold_constants(model) -> None:
    """Fold shape arithmetic on constants (e.g. ReduceMean axes built by Reshape): TensorRT wants
    such inputs as initializers. Weights have no values yet, so they are never folded into copies."""
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The exporter logs every initializer it was not given and every missing optional package."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _torch_dtype(ir_dtype) -> torch.dtype:
    try:
        return TORCH_OF[int(ir_dtype)]
    except KeyError:
        raise ValueError(f"unsupported initializer type {ir_dtype}") from None


def name_nodes_by_module(model: onnx.ModelProto, strip: str = "") -> None:
    """Name nodes `<module path>/<op>_<i>` (e.g. `blocks.3.self_attn.q/MatMul_12`) and drop the
    exporter's bulky metadata (stack traces), so a mismatch points back at a module."""
    for i, node in enumerate(model.graph.node):
        scope = ""
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = [s for s in ast.literal_eval(prop.value) if s]
                except (ValueError, SyntaxError):
                    scopes = []
                # The last scope is the fx node itself; the one before is the innermost module.
                scope = scopes[-2].removeprefix(strip) if len(scopes) >= 2 else ""
        node.name = f"{scope}/{node.op_type}_{i}" if scope else f"{node.op_type}_{i}"
        del node.metadata_props[:]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class ExternalDataWriter:
    """Write a graph and its `<name>.data`, appending tensors page-aligned, under temporary names.

    `commit(model)` renames the data file, then the graph, into place: a graph file under its final
    name always has complete data beside it. Leaving the `with` block without a commit (an error,
    an interrupt) removes both temporary files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data_name = self.path.name + ".data"
        self.tmp_graph = self.path.with_name(f".{self.path.name}.partial")
        self.tmp_data = self.path.with_name(f".{self.data_name}.partial")

    def __enter__(self) -> "ExternalDataWriter":
        self.file = open(self.tmp_data, "wb")
        return self

    def append(self, tp: onnx.TensorProto, raw: bytes) -> None:
        """Store `raw` as the data of `tp` (made external, pointing into the data file)."""
        offset = self.file.tell()
        self.file.write(raw)
        self.file.write(b"\0" * (-len(raw) % ALIGN))
        tp.ClearField("raw_data")
        del tp.external_data[:]
        tp.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tp.external_data.add()
            entry.key, entry.value = k, v

    def commit(self, model: onnx.ModelProto) -> Path:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        with open(self.tmp_graph, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp_data, self.path.with_name(self.data_name))
        os.replace(self.tmp_graph, self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        self.file.close()
        for tmp in (self.tmp_graph, self.tmp_data):
            tmp.unlink(missing_ok=True)


def write_model(
    traced: TracedGraph,
    path: str | os.PathLike,
    weight_source: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Path:
    """Write `path` (graph) and `path + '.data'` (weights), streaming one tensor at a time.

    Each weight is taken from `weight_source`, cast to the dtype the traced graph declared, and
    appended (page-aligned) to the data file. Both files appear under their final names only when
    both are complete.
    """
    get = weight_source.__getitem__ if isinstance(weight_source, Mapping) else weight_source
    release = getattr(weight_source, "release", None)
    with ExternalDataWriter(path) as out:
        for slot in traced.weights if progress is None else progress(traced.weights):
            t = get(slot.name)
            if tuple(t.shape) != slot.shape:
                raise ValueError(f"weight {slot.name}: shape {tuple(t.shape)}, graph expects {slot.shape}")
            tp = onnx.TensorProto(name=slot.name, data_type=ONNX_OF[slot.dtype], dims=list(slot.shape))
            out.append(tp, _tensor_bytes(t.to(slot.dtype)))
            traced.model.graph.initializer.append(tp)
            del t
            if release is not None:  # e.g. drop an mmap'd checkpoint tensor's pages from RSS
                release(slot.name)
        return out.commit(traced.model)


def attach_function(model: onnx.ModelProto, function: onnx.FunctionProto, domain_version: int = 1) -> None:
    """Add a local function (once) and import its domain."""
    if not any(f.domain == function.domain and f.name == function.name for f in model.functions):
        model.functions.append(function)
    if not any(op.domain == function.domain for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(function.domain, domain_version))


def strip_prefix(traced: TracedGraph, prefix: str) -> None:
    """Initializer names become the checkpoint's own (`blocks.0.self_attn.q.weight`), not the entry
    wrapper's (`model.blocks.0...`)."""
    renames = {s.name: s.name.removeprefix(prefix) for s in traced.weights}
    for node in traced.model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    traced.weights[:] = [type(s)(renames[s.name], s.dtype, s.shape) for s in traced.weights]


# --- reading back (untrusted files) ------------------------------------------------------------------

INLINE_MAX_BYTES = 1024  # scales and zero points stay in the graph; weights go to the data file


def raw_bytes(t: TensorProto, base_dir: Path) -> bytes:
    """The little-endian bytes of one initializer (its external location checked by `load_graph`)."""
    if t.data_location == TensorProto.EXTERNAL:
        info = external_info(t)
        with open(base_dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"]))
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()


def to_torch(t: TensorProto, base_dir: Path) -> torch.Tensor:
    dtype = TORCH_OF.get(t.data_type)
    if dtype is None:
        raise GraphFileError(f"initializer {t.name}: unsupported ONNX type {t.data_type}")
    buf = bytearray(raw_bytes(t, base_dir))
    shape = tuple(t.dims)
    if len(buf) != torch.empty(0, dtype=dtype).element_size() * math.prod(shape):
        raise GraphFileError(f"initializer {t.name}: {len(buf)} bytes for shape {shape} of {dtype}")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


class GraphWeights:
    """name -> tensor (stored dtype), read one initializer at a time from a checked graph file."""

    def __init__(self, path: str | os.PathLike, data_file: str | None = None):
        self.path = Path(path)
        self.model = load_graph(self.path, data_file)
        self._protos = {t.name: t for t in self.model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self._protos

    def names(self) -> list[str]:
        return list(self._protos)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return to_torch(self._protos[name], self.path.parent)
        except KeyError:
            raise KeyError(f"{self.path.name} has no initializer {name!r}") from None

    def __call__(self, name: str) -> torch.Tensor:
        return self[name]


def float_state_dict(weights: GraphWeights, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named weights of an exported graph as fp32 (its initializers carry checkpoint keys)."""
    names = list(names)
    missing = [n for n in names if n not in weights]
    if missing:
        raise GraphFileError(f"{weights.path.name} lacks initializers {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                             "not an export of this model?")
    return {n: weights[n].float() for n in names}


def tensor_proto(name: str, value: torch.Tensor) -> TensorProto:
    """An inline initializer with raw little-endian bytes (moved to external data if large)."""
    value = value.detach().contiguous()
    tp = TensorProto(name=name, data_type=ONNX_OF[value.dtype], dims=list(value.shape))
    tp.raw_data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return tp


def save_model(model: onnx.ModelProto, path: str | os.PathLike, source_dir: str | os.PathLike,
               progress: Callable | None = None) -> Path:
    """Write `path` and `path + '.data'`; both appear under their final names only when complete.

    Initializers already external (relative to `source_dir`, checked by `load_graph`) are copied
    tensor by tensor; inline ones above INLINE_MAX_BYTES are moved out. Offsets are page-aligned.
    """
    source_dir = Path(source_dir)
    inits = list(model.graph.initializer)
    with ExternalDataWriter(path) as out:
        for t in (progress(inits, desc="writing weights") if progress else inits):
            if t.data_location != TensorProto.EXTERNAL and len(t.raw_data) <= INLINE_MAX_BYTES:
                continue
            out.append(t, raw_bytes(t, source_dir))
        return out.commit(model)
