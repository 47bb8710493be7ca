"""Trace a module built on `meta` to ONNX, then stream its weights into an external-data file.

Tracing on `meta` costs no weight memory whatever the model size; weights then go from the
(mmap'd) checkpoint to disk one tensor at a time, so peak memory stays near one tensor plus the
traced graph. Files are written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import onnx
import torch

OPSET = 20  # TensorRT 10.x parses opsets 9..20 (REFERENCE section 6)
ALIGN = 4096  # external-data offsets aligned to pages so runtimes may mmap them

TORCH_OF = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
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
