"""TensorRT compatibility lint: what in an ONNX graph TensorRT (>= 10.9) will refuse or run badly.

It reads the graph only (no TensorRT needed) and reports node names, so a finding points at the
module that produced it. Sources: TensorRT's ONNX operator support matrix and parser notes, and
TensorRT for RTX's parser and builder run on synthetic graphs of each pattern (tests/test_rtx.py
checks every rule against it where it is installed). Where the two TensorRTs differ, the rule
follows the stricter one and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from turbotrt.core import sagesla as C

# ONNX ops TensorRT's parser supports (operator matrix of TensorRT 10.0; later versions add more).
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
TOPK_MAX_K = 3840  # the largest K TensorRT's TopK layer takes
NORM_OPS = {"LayerNormalization", "ReduceMean", "Softmax", "GroupNormalization"}
INT_TYPES = {TensorProto.INT32, TensorProto.INT64}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error": TensorRT will refuse the graph; "warning": it builds, but risky or slow
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity:7s} {self.node} ({self.op}): {self.message}"


def _types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        g = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False).graph
    except onnx.shape_inference.InferenceError:  # a malformed node: lint what is declared
        g = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def _constants(model: onnx.ModelProto) -> set[str]:
    """Tensor names known at build time: initializers, Constant outputs, and whatever nodes compute
    from those alone (graph nodes are in topological order)."""
    names = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" or (n.input and all(not i or i in names for i in n.input)):
            names.update(o for o in n.output if o)
    return names


def lint_model(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> list[Finding]:
    """Findings for `model`; `base_dir` is the graph's folder, where initializers stored as external
    data are read from (a 1.3B graph's per-channel zero points are)."""
    findings: list[Finding] = []

    def value(t: TensorProto):
        if t.data_location == TensorProto.EXTERNAL and base_dir is None:
            return None
        return onnx.numpy_helper.to_array(t, base_dir="" if base_dir is None else str(base_dir))

    types = _types(model)
    consts = _constants(model)
    local_functions = {(f.domain, f.name) for f in model.functions}

    def add(sev, node, msg):
        findings.append(Finding(sev, node.name or "<unnamed>", node.op_type, msg))

    for node in model.graph.node:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            if node.domain == C.DOMAIN and op == C.OP_TYPE:
                if "plugin_namespace" not in attrs:
                    # Standard TensorRT >= 10.15 would inline the body instead of using the plugin
                    # (TensorRT for RTX, without plugins, inlines it either way).
                    add("error", node, "custom node without plugin_namespace: TensorRT >= 10.15 would inline its "
                                       "function body instead of using the plugin")
                if (node.domain, op) not in local_functions:
                    add("error", node, "no local function body: ONNX Runtime cannot run this graph and TensorRT "
                                       "for RTX refuses it (no plugins)")
                idx = node.input[3] if len(node.input) > 3 else ""
                if types.get(idx, TensorProto.INT32) != TensorProto.INT32:
                    add("error", node, "block_idx must be int32 (the plugin contract)")
            else:
                add("error", node, f"custom domain {node.domain!r}: needs a TensorRT plugin named {op}")
            continue
        if op not in TRT_OPS:
            add("error", node, "not supported by TensorRT's ONNX parser")
        out_types = [types.get(o) for o in node.output]
        in_types = [types.get(i) for i in node.input if i]
        if TensorProto.DOUBLE in out_types + in_types:
            add("warning", node, "float64 tensor: TensorRT casts DOUBLE down to FLOAT (compute it outside the graph)")
        if op == "TopK":
            if attrs.get("sorted", 1) != 1:
                # Standard TensorRT's parser requires it (onnx-tensorrt operator notes); TensorRT for
                # RTX builds sorted=0, so this error is for standard TensorRT's sake.
                add("error", node, "TopK needs sorted=1 in TensorRT")
            if in_types and in_types[0] == TensorProto.BFLOAT16:
                add("warning", node, "bf16 TopK: cast the scores to float32 (ONNX Runtime CPU has no bf16 TopK)")
            k_init = next((t for t in model.graph.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
            k = None if k_init is None else value(k_init)
            if k is not None and k.max() > TOPK_MAX_K:
                add("error", node, f"TopK K must be at most {TOPK_MAX_K}")
        if op in ("ReduceMean", "Pad", "CumSum") and len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
            add("error", node, "axes must be an initializer/constant for TensorRT")
        if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = next((t for t in model.graph.initializer if t.name == node.input[2]), None)
            zp_value = None if zp is None else value(zp)
            if zp is None or (zp_value is not None and zp_value.any()):
                add("error", node, "zero point must be a constant 0 (TensorRT Q/DQ is symmetric)")
            elif zp_value is None:
                add("warning", node, "zero point stored as external data: not checked (lint the graph file)")
        if op == "LayerNormalization" and len(node.output) > 1 and any(node.output[1:]):
            add("error", node, "TensorRT supports only the first output of LayerNormalization")
        if op in NORM_OPS and in_types and in_types[0] == TensorProto.FLOAT16:
            add("warning", node, "fp16 normalization/softmax: keep norms in fp32 (overflow and precision risk)")
        if op == "Resize" and attrs.get("antialias", 0):
            add("error", node, "TensorRT's Resize has no antialiasing")
        if (op == "Clip" and in_types and in_types[0] in INT_TYPES and node.input[0] in consts
                and len(node.input) > 1 and node.input[1] and (len(node.input) < 3 or not node.input[2])):
            # TensorRT for RTX's compiler fails to fold it: "Cannot convert scalar operand of type 11 to
            # float" (clamp a float instead, or give both bounds).
            add("error", node, "integer Clip with only a lower bound on a constant: TensorRT for RTX cannot compile it")
    findings += _function_name_clashes(model)
    for i in model.graph.input:
        if i.type.tensor_type.elem_type == TensorProto.INT64:
            findings.append(Finding("warning", i.name, "input", "int64 graph input: TensorRT prefers int32"))
    return findings


def _function_name_clashes(model: onnx.ModelProto) -> list[Finding]:
    """Values a local function makes under a name the main graph also uses. A parser that inlines the
    function (TensorRT for RTX does) can resolve one for the other: on the 1.3B DiT a float exponent
    became the body's int64 tensor; with matching types it would be silently wrong."""
    main = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    main |= {i.name for i in model.graph.input}
    out = []
    for f in model.functions:
        clash = sorted({o for n in f.node for o in n.output if o in main} - set(f.output) - set(f.input))
        if clash:
            out.append(Finding("error", f"{f.domain}.{f.name}", "function",
                               f"{len(clash)} body values share main-graph names ({', '.join(clash[:3])}): an inlining "
                               "parser can mix them up"))
    return out


def lint(path: str | os.PathLike) -> list[Finding]:
    return lint_model(onnx.load(str(path), load_external_data=False), base_dir=Path(path).parent)
