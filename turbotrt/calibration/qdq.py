"""Insert explicit Q/DQ into the exported DiT graph, following TensorRT's placement rules.

The export writes each Linear as `Transpose(W) -> MatMul(x, .) -> Add(bias)`, W named by its
checkpoint key. For every quantized block Linear this becomes

    x -> QuantizeLinear(scale_x, zp 0) -> DequantizeLinear --------------> MatMul -> Add(bias)
    W_q [in, out] (INT8 / FLOAT8E4M3FN initializer) -> DequantizeLinear --^

- Activations: per tensor, symmetric (zero point 0 of the quantized type), on the MatMul input. A
  tensor feeding several quantized MatMuls with the same scale (q/k/v of a block; cross-attention
  k/v) gets one Q/DQ pair that they share, so the tensor is quantized once.
- Weights: pre-quantized codes stored transposed ([in, out], the MatMul's B layout, so no Transpose
  sits between the DQ and the GEMM) with a DequantizeLinear on axis 1, the output channel:
  INT8 per channel, FP8 e4m3 per tensor. Zero points are all 0 (TensorRT is symmetric only).
- Everything else stays float: norms, softmax, modulation, embeddings, the head, SLA's proj_l and
  the SageSLA node (which quantizes its own Q/K/V inside the plugin); outputs are never quantized.

Scales take the graph's float type (fp32/fp16/bf16), as QuantizeLinear needs x and its scale alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import onnx
import torch
from onnx import TensorProto, helper

from turbotrt.core.errors import TurbotrtError
from turbotrt.export.onnx_io import TORCH_OF, load_graph, save_model, tensor_proto
from turbotrt.calibration.quantize import FP8_MAX, QuantizedWeight, act_scale


class QdqError(TurbotrtError):
    pass


@dataclass
class LinearSite:
    """Where one Linear lives in the exported graph."""

    name: str
    transpose: onnx.NodeProto
    matmul: onnx.NodeProto

    @property
    def activation(self) -> str:
        return self.matmul.input[0]


@dataclass
class QdqSummary:
    quantized: list[str] = field(default_factory=list)  # Linear names
    shared_inputs: dict[str, list[str]] = field(default_factory=dict)  # Q/DQ pair owner -> its MatMuls
    path: Path | None = None


def find_linear_sites(model: onnx.ModelProto, names) -> dict[str, LinearSite]:
    """Map each Linear to its Transpose(W) and MatMul nodes; refuse any other pattern loudly."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    inits = {t.name for t in model.graph.initializer}
    sites = {}
    for name in names:
        w = f"{name}.weight"
        if w not in inits:
            raise QdqError(f"the graph has no initializer {w}: not an export of this model?")
        users = consumers.get(w, [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            raise QdqError(f"{w} is used by {[n.op_type for n in users]}; expected one Transpose -> MatMul "
                           "(was the graph already quantized?)")
        tr = users[0]
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        mm = consumers.get(tr.output[0], [])
        if perm != [1, 0] or len(mm) != 1 or mm[0].op_type != "MatMul" or mm[0].input[1] != tr.output[0]:
            raise QdqError(f"{w}: expected Transpose(perm=[1, 0]) -> MatMul(x, W^T), found "
                           f"{tr.op_type}(perm={perm}) -> {[n.op_type for n in mm]}")
        sites[name] = LinearSite(name, tr, mm[0])
    return sites


def _graph_float_type(model: onnx.ModelProto, weight_name: str) -> int:
    t = next(t for t in model.graph.initializer if t.name == weight_name)
    if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise QdqError(f"{weight_name} is of ONNX type {t.data_type}, not a float weight")
    return t.data_type


def _zero_point(name: str, mode: str, shape=()) -> TensorProto:
    dtype = torch.int8 if mode == "int8" else torch.float8_e4m3fn
    return tensor_proto(name, torch.zeros(shape, dtype=dtype))


def insert_qdq(
    src: str | os.PathLike,
    src_data: str | None,
    dst: str | os.PathLike,
    weights: Mapping[str, QuantizedWeight],
    amax: Mapping[str, float],
    mode: str,
    float_overrides: Mapping[str, torch.Tensor] | None = None,
    progress: Callable | None = None,
) -> QdqSummary:
    """Write `dst` (+ `.data`): `src` (its external data in `src_data`, checked) with Q/DQ around each
    Linear in `weights`. `dst` may be `src`: the new files replace the old ones only when complete.

    amax: activation amax per Linear; float_overrides: new values of float initializers (SmoothQuant
    folds), stored in each initializer's own type.
    """
    src, dst = Path(src), Path(dst)
    model = load_graph(src, src_data)
    names = list(weights)
    missing = [n for n in names if n not in amax]
    if missing:
        raise QdqError(f"no activation amax for {missing[:5]}")
    sites = find_linear_sites(model, names)
    ftype = _graph_float_type(model, f"{names[0]}.weight") if names else TensorProto.FLOAT
    fdtype = TORCH_OF[ftype]

    new_inits: list[TensorProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes to insert right before it
    drop_nodes, drop_inits = set(), set()
    summary = QdqSummary()

    def insert(anchor, *nodes):
        before.setdefault(id(anchor), []).extend(nodes)

    order = {id(n): i for i, n in enumerate(model.graph.node)}
    groups: dict[tuple[str, float], list[LinearSite]] = {}
    for name in names:
        site = sites[name]
        groups.setdefault((site.activation, act_scale(amax[name], mode)), []).append(site)
    for (tensor, scale), members in groups.items():
        members.sort(key=lambda s: order[id(s.matmul)])
        owner = members[0].name
        q_out, dq_out = f"{owner}.input_quantized", f"{owner}.input_dequantized"
        new_inits += [tensor_proto(f"{owner}.input_scale", torch.tensor(scale, dtype=torch.float32).to(fdtype)),
                      _zero_point(f"{owner}.input_zero_point", mode)]
        insert(members[0].matmul,
               helper.make_node("QuantizeLinear", [tensor, f"{owner}.input_scale", f"{owner}.input_zero_point"],
                                [q_out], name=f"{owner}/input_quantizer/QuantizeLinear"),
               helper.make_node("DequantizeLinear", [q_out, f"{owner}.input_scale", f"{owner}.input_zero_point"],
                                [dq_out], name=f"{owner}/input_quantizer/DequantizeLinear"))
        for s in members:
            s.matmul.input[0] = dq_out
        summary.shared_inputs[owner] = [s.name for s in members]

    for name in names:
        site, qw = sites[name], weights[name]
        _check_weight(name, qw, mode)
        codes = qw.codes.t().contiguous()  # [in, out]: MatMul's B, output channel on axis 1
        w_q, w_s, w_zp, w_dq = (f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point",
                                f"{name}.weight_dequantized")
        per_channel = qw.scale.ndim == 1
        new_inits += [tensor_proto(w_q, codes), tensor_proto(w_s, qw.scale.float().to(fdtype)),
                      _zero_point(w_zp, mode, tuple(qw.scale.shape))]
        attrs = {"axis": 1} if per_channel else {}
        insert(site.matmul, helper.make_node("DequantizeLinear", [w_q, w_s, w_zp], [w_dq],
                                             name=f"{name}/weight_quantizer/DequantizeLinear", **attrs))
        site.matmul.input[1] = w_dq
        drop_nodes.add(id(site.transpose))
        drop_inits.add(f"{name}.weight")
        summary.quantized.append(name)

    nodes = []
    for n in model.graph.node:
        nodes += before.get(id(n), [])
        if id(n) not in drop_nodes:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)

    overrides = dict(float_overrides or {})
    kept = []
    for t in model.graph.initializer:
        if t.name in drop_inits:
            continue
        if t.name in overrides:
            kept.append(_override(t, overrides.pop(t.name)))
        else:
            kept.append(t)
    if overrides:
        raise QdqError(f"float overrides name no initializer of the graph: {sorted(overrides)[:5]}")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    _drop_stale_value_info(model)
    summary.path = save_model(model, dst, src.parent, progress)
    return summary


def _check_weight(name: str, qw: QuantizedWeight, mode: str) -> None:
    want = torch.int8 if mode == "int8" else torch.float8_e4m3fn
    if qw.codes.dtype != want or qw.codes.ndim != 2:
        raise QdqError(f"{name}: weight codes are {qw.codes.dtype} {tuple(qw.codes.shape)}, {mode} needs 2-D {want}")
    if mode == "int8" and (qw.scale.ndim != 1 or qw.scale.numel() != qw.codes.shape[0]):
        raise QdqError(f"{name}: int8 weights are per output channel: scale must be [{qw.codes.shape[0]}]")
    if mode == "fp8" and qw.scale.ndim != 0:
        raise QdqError(f"{name}: fp8 weights are per tensor: scale must be a scalar")
    if not bool((qw.scale > 0).all()):
        raise QdqError(f"{name}: weight scales must be positive")
    if mode == "fp8" and float(qw.codes.float().abs().max()) > FP8_MAX:
        raise QdqError(f"{name}: fp8 codes beyond +-{FP8_MAX}")


def _override(t: TensorProto, value: torch.Tensor) -> TensorProto:
    if tuple(value.shape) != tuple(t.dims):
        raise QdqError(f"override of {t.name}: shape {tuple(value.shape)}, graph has {tuple(t.dims)}")
    return tensor_proto(t.name, value.detach().to(TORCH_OF[t.data_type]))


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    """Shape annotations of tensors that no longer exist (the removed weight Transposes)."""
    alive = {o for n in model.graph.node for o in n.output}
    keep = [v for v in model.graph.value_info if v.name in alive]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
