"""`torch.ops.turbotrt.sagesla`: the SageSLA contract as a torch custom op.

Same inputs, attributes and output as `contract.py` (the ONNX node and the TensorRT plugin), so a
model can call one op in eager PyTorch, under torch.compile and during export:
- CUDA tensors run the Triton kernels (`kernels.sagesla_forward`);
- any other device runs the reference math: `sparse_attention` for quant "none",
  `sagesla_sparse_attention` for the low-bit modes. The reference derives K's mean and V's amax from
  k and v itself; the contract defines k_mean and v_amax as exactly those reductions, so the inputs
  are only checked for shape and dtype there;
- a fake implementation propagates shapes for tracing (FakeTensor, meta device).

sm_scale must be D^-0.5 (the contract's definition; the reference hard-codes it).
"""

from __future__ import annotations

import math

import torch

from turbotrt.models import attention as ref
from turbotrt.plugins.sagesla import contract as C

OP_NAME = "turbotrt::sagesla"
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FLOAT_DTYPES = tuple(_TORCH_DTYPES[n] for n in C.FLOAT_DTYPES)


def _check(q, k, v, block_idx, k_mean, v_amax, block_q, block_k, topk, sm_scale, quant) -> C.SageSLAAttrs:
    attrs = C.SageSLAAttrs(block_q=block_q, block_k=block_k, topk=topk, sm_scale=sm_scale, quant=quant)
    C.check_shapes(tuple(q.shape), tuple(block_idx.shape), attrs)
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"SageSLA q must be one of {C.FLOAT_DTYPES}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"SageSLA {name} must match q {tuple(q.shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if block_idx.dtype != torch.int32:
        raise ValueError(f"SageSLA block_idx must be int32, got {block_idx.dtype}")
    stat_shape = (*q.shape[:2], 1, q.shape[3])
    for name, t in (("k_mean", k_mean), ("v_amax", v_amax)):
        if tuple(t.shape) != stat_shape or t.dtype != torch.float32:
            raise ValueError(f"SageSLA {name} must be float32 {stat_shape}, got {t.dtype} {tuple(t.shape)}")
    D = q.shape[-1]
    if not math.isclose(sm_scale, D**-0.5, rel_tol=1e-6):  # fp32 attributes round D^-0.5 by < 6e-8
        raise ValueError(f"SageSLA sm_scale must be head_dim^-0.5 = {D**-0.5}, got {sm_scale}")
    return attrs


@torch.library.custom_op(OP_NAME, mutates_args=())
def sagesla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
            k_mean: torch.Tensor, v_amax: torch.Tensor, block_q: int, block_k: int, topk: int,
            sm_scale: float, quant: str = "none") -> torch.Tensor:
    """o_s `[B, H, L, D]` (q's dtype): block-sparse attention over the kept key blocks (see contract)."""
    _check(q, k, v, block_idx, k_mean, v_amax, block_q, block_k, topk, sm_scale, quant)
    if quant == "none":
        out = ref.sparse_attention(q, k, v, block_idx, block_q, block_k)
    else:
        out = ref.sagesla_sparse_attention(q, k, v, block_idx, block_q, block_k, C.QUANT_MODES[quant])
    return out.contiguous()  # the reference returns a view into block-padded storage; the contract: contiguous


@sagesla.register_kernel("cuda")
def _sagesla_cuda(q, k, v, block_idx, k_mean, v_amax, block_q, block_k, topk, sm_scale, quant="none"):
    _check(q, k, v, block_idx, k_mean, v_amax, block_q, block_k, topk, sm_scale, quant)
    if quant == "int8_fp8" and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise RuntimeError(f"SageSLA int8_fp8 needs FP8 (sm_89 or newer); {torch.cuda.get_device_name(q.device)} "
                           "has none: use quant='int8_fp16'")
    from turbotrt.plugins.sagesla import kernels

    return kernels.sagesla_forward(q, k, v, block_idx, k_mean, v_amax, block_q, block_k, sm_scale, quant)


@sagesla.register_fake
def _sagesla_fake(q, k, v, block_idx, k_mean, v_amax, block_q, block_k, topk, sm_scale, quant="none"):
    attrs = C.SageSLAAttrs(block_q=block_q, block_k=block_k, topk=topk, sm_scale=sm_scale, quant=quant)
    torch._check(q.dim() == 4 and block_idx.dim() == 4, lambda: "SageSLA q and block_idx must be 4-D")
    torch._check(block_idx.shape[-1] == attrs.topk, lambda: f"SageSLA block_idx must keep topk={topk} blocks")
    torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "SageSLA k and v must match q's shape")
    return torch.empty_like(q)
