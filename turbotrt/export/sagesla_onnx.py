"""SLA self-attention as it is exported: standard ops around one `turbodiffusion::SageSLA` node.

The node follows the op contract (`turbotrt.core.sagesla`). Its ONNX function body (the same name
and domain, attached to the model after export because torch's exporter inlines functions it is
given) is the float sparse core traced from the PyTorch reference, so ONNX Runtime runs the
reference math and TensorRT, seeing `plugin_namespace`, runs the plugin.

The reference knows nothing of this: before tracing, `swap_for_export` replaces each sparse
`SparseLinearAttention` of a model by `SageSLAExport`, which holds the same `proj_l` (so weights
keep their checkpoint names) and emits the node.
"""

from __future__ import annotations

import warnings

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from turbotrt.core import sagesla as C
from turbotrt.core.configs import AttentionConfig
from turbotrt.models import attention as ref


def block_map_export(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, topk: float) -> torch.Tensor:
    """`ref.block_map` in TensorRT-friendly ops: int32 `[B, H, Nq, n]`, rows ascending.

    TensorRT's TopK needs sorted=1 and float input, so the n best blocks come from a sorted float
    TopK, and the ascending order from a second TopK over `Nk - j` of the kept blocks (no int Sort).
    Equal to `ref.block_map` except on exact score ties.
    """
    q32, k32 = q.float(), k.float()
    pooled_q = ref._mean_pool(q32, block_q)
    pooled_k = ref._mean_pool(k32 - k32.mean(dim=-2, keepdim=True), block_k)
    score = pooled_q @ pooled_k.transpose(-1, -2)  # [B, H, Nq, Nk]
    nk = score.shape[-1]
    n = C.kept_blocks(nk, topk)
    if n == nk:
        idx = torch.arange(nk, dtype=torch.int32, device=q.device)
        return idx.expand(*score.shape[:-1], nk)
    kth = score.topk(n, dim=-1, sorted=True).values[..., -1:]
    rank = (nk - torch.arange(nk, device=q.device)).float()  # larger for smaller block index
    keyed = torch.where(score >= kth, rank, torch.zeros_like(rank))
    return (nk - keyed.topk(n, dim=-1, sorted=True).values).to(torch.int32)


def sagesla_node(q, k, v, block_idx, k_mean, v_amax, attrs: C.SageSLAAttrs) -> torch.Tensor:
    """Emit the custom node (export only: eager torch gives no values for it)."""
    C.check_shapes(tuple(q.shape), tuple(block_idx.shape), attrs)
    out = torch.onnx.ops.symbolic(
        f"{C.DOMAIN}::{C.OP_TYPE}", (q, k, v, block_idx, k_mean, v_amax), attrs.to_onnx(),
        dtype=q.dtype, shape=q.shape, version=C.OPSET_VERSION,
    )
    return out.to(q.device)  # symbolic() makes its output on the CPU; tracing on meta needs one device


def attrs_for(q_shape, config: AttentionConfig) -> C.SageSLAAttrs:
    return C.SageSLAAttrs.for_shape(q_shape, config.block_q, config.block_k, config.topk, config.quant)


def sla_attention_export(q, k, v, proj_l: nn.Linear, config: AttentionConfig) -> torch.Tensor:
    """`ref.sla_attention` for sla/sagesla with the sparse core as the custom node; `[B, H, L, D]`."""
    attrs = attrs_for(q.shape, config)
    idx = block_map_export(q, k, config.block_q, config.block_k, config.topk)
    k_mean = k.float().mean(dim=-2, keepdim=True)
    v_amax = v.float().abs().amax(dim=-2, keepdim=True)
    o_s = sagesla_node(q, k, v, idx, k_mean, v_amax, attrs)
    bias = None if proj_l.bias is None else proj_l.bias.float()
    o_l = F.linear(ref._linear(q, k, v), proj_l.weight.float(), bias)
    return (o_s.float() + o_l).to(q.dtype)


class SageSLAExport(nn.Module):
    """`SparseLinearAttention` as exported: the sparse core is the custom node. Same `proj_l`, so the
    graph's initializers keep the checkpoint's names."""

    def __init__(self, source: ref.SparseLinearAttention):
        super().__init__()
        self.head_dim, self.config = source.head_dim, source.config
        self.proj_l = source.proj_l

    def forward(self, q, k, v):
        return sla_attention_export(q, k, v, self.proj_l, self.config)


def swap_for_export(model: nn.Module) -> int:
    """Replace every sparse (sla/sagesla) `SparseLinearAttention` of `model` in place; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, ref.SparseLinearAttention) and module.config.sparse:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, SageSLAExport(module))
            swapped += 1
    return swapped


# --- the function body ------------------------------------------------------------------------------

class _SparseCore(nn.Module):
    """The contract's signature around the float reference core (k_mean and v_amax unused: they only
    feed the low-bit quantizers, and the body is the exact-softmax reference)."""

    def __init__(self, block_q: int, block_k: int):
        super().__init__()
        self.block_q, self.block_k = block_q, block_k

    def forward(self, q, k, v, block_idx, k_mean, v_amax):
        return ref._sparse(q, k, v, block_idx, self.block_q, self.block_k).to(q.dtype)


BODY_SCOPE = "SageSLA/"


def _scope_values(nodes, keep: set[str]) -> None:
    """Prefix every value the body makes (all but its inputs and outputs) with `SageSLA/`.

    The exporter names values `val_283`, `mul_1`, ... in the body and in the main graph alike, and a
    parser that inlines the body (TensorRT for RTX does) can resolve a body's constant by its name in
    the main graph: on the 1.3B DiT a float exponent 2.0 became the body's int64 [153] tensor. The
    prefix keeps the two namespaces apart (the lint checks it)."""
    names = {o for n in nodes for o in n.output if o and o not in keep}
    for n in nodes:
        n.output[:] = [BODY_SCOPE + o if o in names else o for o in n.output]
        n.input[:] = [BODY_SCOPE + i if i in names else i for i in n.input]


def function_body(q_shape, dtype: torch.dtype, attrs: C.SageSLAAttrs, opset: int) -> onnx.FunctionProto:
    """FunctionProto `turbodiffusion.SageSLA` specialised to one static q shape (every layer's)."""
    B, H, L, D = q_shape
    nq = C.cdiv(L, attrs.block_q)
    meta = dict(device="meta")  # shapes only: a 480p body needs no activation memory to trace
    args = (
        torch.empty(q_shape, dtype=dtype, **meta), torch.empty(q_shape, dtype=dtype, **meta),
        torch.empty(q_shape, dtype=dtype, **meta), torch.empty(B, H, nq, attrs.kept_blocks, dtype=torch.int32, **meta),
        torch.empty(B, H, 1, D, **meta), torch.empty(B, H, 1, D, **meta),
    )
    from turbotrt.export.onnx_io import _quiet

    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_SparseCore(attrs.block_q, attrs.block_k).eval(), args, dynamo=True,
                                 opset_version=opset, input_names=list(C.INPUT_NAMES),
                                 output_names=list(C.OUTPUT_NAMES), optimize=False, verbose=False)
    model = prog.model_proto
    g = model.graph
    nodes = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in g.initializer]
    for i, n in enumerate(g.node):
        n.name = f"SageSLA/{n.op_type}_{i}"
        del n.metadata_props[:]
    nodes += list(g.node)
    _scope_values(nodes, keep={i.name for i in g.input} | {o.name for o in g.output})
    used = {i for n in nodes for i in n.input}
    inputs = [i.name for i in g.input]
    missing = [i for i in inputs if i not in used and i not in ("k_mean", "v_amax")]
    if missing:
        raise RuntimeError(f"SageSLA body lost inputs {missing}")
    return onnx.helper.make_function(
        C.DOMAIN, C.OP_TYPE, inputs, [o.name for o in g.output], nodes,
        opset_imports=[op for op in model.opset_import if op.domain in ("", "ai.onnx")],
        attributes=list(C.SageSLAAttrs.__dataclass_fields__),
    )
