"""SLA self-attention as it is exported: standard ops around one `turbodiffusion::SageSLA` node.

The node follows the op contract (`turbotrt.core.sagesla`). Its ONNX function body (the same name
and domain, attached to the model after export because torch's exporter inlines functions it is
given) is the float sparse core of the PyTorch reference (`attention._sparse`), written node by
node and tested against it, so ONNX Runtime and TensorRT for RTX (which inline it) run the reference
math, and standard TensorRT, seeing `plugin_namespace`, runs the plugin.

The reference knows nothing of this: before tracing, `swap_for_export` replaces each sparse
`SparseLinearAttention` of a model by `SageSLAExport`, which holds the same `proj_l` (so weights
keep their checkpoint names) and emits the node.
"""

from __future__ import annotations

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
#
# Written node by node rather than traced: a traced body unrolls the reference's Python loop over
# chunks of query blocks (8,067 nodes per layer at 480p / 81 frames, more than the whole DiT, and
# minutes of session creation). This one is the same float math in a fixed number of nodes at any L:
# keys and values are gathered a whole block at a time (`Gather` on the block axis of a
# `[B*H*Nk, block_k, D]` view, a contiguous copy), and when the gathered blocks of all query blocks
# would not fit `GATHER_BUDGET`, an ONNX `Loop` walks chunks of query blocks so memory stays bounded.

BODY_SCOPE = "SageSLA/"

# Gathered keys (and values) per chunk of query blocks stay under this many fp32 elements (256 MiB).
GATHER_BUDGET = 1 << 26

_FLOAT, _INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def body_chunking(q_shape, attrs: C.SageSLAAttrs, budget: int = GATHER_BUDGET) -> tuple[int, int]:
    """(query blocks per chunk, chunks): one chunk when everything fits the budget."""
    B, H, L, D = q_shape
    nq = C.cdiv(L, attrs.block_q)
    per_query_block = B * H * attrs.kept_blocks * attrs.block_k * D
    chunk = max(1, min(nq, budget // per_query_block))
    return chunk, C.cdiv(nq, chunk)


class _Nodes:
    """Collects nodes whose made values all live under `SageSLA/`, so a parser that inlines the body
    cannot confuse them with main-graph values of the same name (the lint checks it)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = BODY_SCOPE + name
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, values, dtype=_INT64, dims=None) -> str:
        import numpy as np

        arr = np.asarray(values, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype))
        tensor = onnx.numpy_helper.from_array(arr.reshape(arr.shape if dims is None else dims), BODY_SCOPE + name)
        return self("Constant", [], name, value=tensor)


def function_body(q_shape, dtype: torch.dtype, attrs: C.SageSLAAttrs, opset: int,
                  budget: int = GATHER_BUDGET) -> onnx.FunctionProto:
    """FunctionProto `turbodiffusion.SageSLA` for one static q shape (every layer's): `ref._sparse`,
    exact softmax over each query block's kept key blocks, in float32, cast back to q's dtype."""
    import numpy as np

    B, H, L, D = q_shape
    bq, bk, n = attrs.block_q, attrs.block_k, attrs.kept_blocks
    nq, nk = C.cdiv(L, bq), C.cdiv(L, bk)
    chunk, chunks = body_chunking(q_shape, attrs, budget)
    nq_pad = chunk * chunks  # query blocks padded to whole chunks; the padding rows are cut off at the end
    elem = {torch.float32: _FLOAT, torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]

    g = _Nodes()

    def pad_axis(x: str, axis: int, rank: int, amount: int, name: str) -> str:
        if amount == 0:
            return x
        pads = [0] * (2 * rank)
        pads[rank + axis] = amount
        return g("Pad", [x, g.const(name + "_pads", pads)], name)

    def to_float(x: str, name: str) -> str:
        return x if elem == _FLOAT else g("Cast", [x], name, to=_FLOAT)

    # Queries, scaled once (D^-0.5), as [B, H, chunks, chunk, block_q, D].
    q32 = g("Mul", [to_float("q", "q_f32"), g.const("sm_scale", D**-0.5, _FLOAT, dims=[])], "q_scaled")
    q32 = pad_axis(q32, 2, 4, nq_pad * bq - L, "q_padded")
    qb = g("Reshape", [q32, g.const("q_chunks_shape", [B, H, chunks, chunk, bq, D])], "q_chunks")
    # Keys and values as B*H*Nk blocks; the flat block index of (b, h, j) is (b*H + h)*Nk + j.
    kv = []
    for x in ("k", "v"):
        x32 = pad_axis(to_float(x, f"{x}_f32"), 2, 4, nk * bk - L, f"{x}_padded")
        kv.append(g("Reshape", [x32, g.const(f"{x}_blocks_shape", [B * H * nk, bk, D])], f"{x}_blocks"))
    idx = g("Cast", ["block_idx"], "idx_i64", to=_INT64)
    idx = pad_axis(idx, 2, 4, nq_pad - nq, "idx_padded")  # padding rows pick block 0: valid, then discarded
    chunk_shape = g.const("idx_chunks_shape", [B, H, chunks, chunk, n])
    offsets = g.const("bh_offsets", (np.arange(B * H) * nk).reshape(B, H, 1, 1))
    flat = g("Reshape", [g("Add", [idx, offsets], "flat_idx"), chunk_shape], "flat_idx_chunks")
    # Key slots past L in a partial last block get -inf before the softmax (weight 0, as the reference).
    masked = L % bk != 0
    if masked:
        bias = np.where(np.arange(nk * bk) < L, 0.0, -np.inf).astype(np.float32).reshape(nk, bk)
        bias = g.const("key_bias", bias, _FLOAT)
        idx_chunks = g("Reshape", [idx, chunk_shape], "idx_chunks")

    # One chunk of query blocks; `i` selects it.
    def chunk_nodes(i: str) -> str:
        qi = g("Gather", [qb, i], "chunk_q", axis=2)  # [B, H, chunk, bq, D]
        fi = g("Gather", [flat, i], "chunk_flat_idx", axis=2)  # [B, H, chunk, n]
        gathered_shape = g.const("gathered_shape", [B, H, chunk, n * bk, D])
        keys = g("Reshape", [g("Gather", [kv[0], fi], "keys_blocks", axis=0), gathered_shape], "keys")
        vals = g("Reshape", [g("Gather", [kv[1], fi], "vals_blocks", axis=0), gathered_shape], "vals")
        s = g("MatMul", [qi, g("Transpose", [keys], "keys_t", perm=[0, 1, 2, 4, 3])], "scores")  # [B, H, chunk, bq, n*bk]
        if masked:
            ii = g("Gather", [idx_chunks, i], "chunk_idx", axis=2)
            b = g("Gather", [bias, ii], "chunk_bias_blocks", axis=0)  # [B, H, chunk, n, bk]
            s = g("Add", [s, g("Reshape", [b, g.const("bias_shape", [B, H, chunk, 1, n * bk])], "chunk_bias")], "scores_masked")
        p = g("Softmax", [s], "probs", axis=-1)
        return g("MatMul", [p, vals], "chunk_out")  # [B, H, chunk, bq, D]

    if chunks == 1:
        out = g("Unsqueeze", [chunk_nodes(g.const("chunk0", 0, dims=[])), g.const("axis0", [0])], "chunks_out")
    else:
        outer, g.nodes = g.nodes, []
        i, cond = BODY_SCOPE + "i", BODY_SCOPE + "cond"
        result = chunk_nodes(i)
        g.nodes.append(onnx.helper.make_node("Identity", [cond], [BODY_SCOPE + "cond_out"], name=BODY_SCOPE + "cond_out"))
        loop_body = onnx.helper.make_graph(
            g.nodes, "SageSLA_chunk",
            [onnx.helper.make_tensor_value_info(i, _INT64, []), onnx.helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, [])],
            [onnx.helper.make_tensor_value_info(BODY_SCOPE + "cond_out", onnx.TensorProto.BOOL, []),
             onnx.helper.make_tensor_value_info(result, _FLOAT, [B, H, chunk, bq, D])])
        g.nodes = outer
        keep_going = g.const("keep_going", True, onnx.TensorProto.BOOL, dims=[])  # TensorRT's parser wants a condition
        out = g("Loop", [g.const("chunks", chunks, dims=[]), keep_going], "chunks_out", body=loop_body)  # [chunks, B, H, chunk, bq, D]
    out = g("Transpose", [out], "chunks_ordered", perm=[1, 2, 0, 3, 4, 5])
    out = g("Reshape", [out, g.const("tokens_shape", [B, H, nq_pad * bq, D])], "tokens")
    if nq_pad * bq != L:
        out = g("Slice", [out, g.const("slice_start", [0]), g.const("slice_end", [L]), g.const("slice_axis", [2])], "tokens_cut")
    g.nodes.append(onnx.helper.make_node("Cast", [out], ["o_s"], name=BODY_SCOPE + "o_s", to=elem))
    return onnx.helper.make_function(
        C.DOMAIN, C.OP_TYPE, list(C.INPUT_NAMES), list(C.OUTPUT_NAMES), g.nodes,
        opset_imports=[onnx.helper.make_opsetid("", opset)],
        attributes=list(C.SageSLAAttrs.__dataclass_fields__),
    )
