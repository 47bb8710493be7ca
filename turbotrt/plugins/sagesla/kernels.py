"""Triton kernels for the SageSLA op (`contract.py`), each beside the reference it mirrors.

Kernels
- `_quant_int8_kernel`: INT8 per block of Q or of mean-smoothed K
  (reference: `turbotrt.models.attention.quantize_per_block_int8`).
- `_quant_v_kernel`: V as FP8 e4m3 per channel (scale amax / 2.25) or as fp16 for sm80
  (reference: `quantize_v_per_channel`).
- `_sagesla_fwd_kernel`: the op itself as ONE kernel over the contract's inputs: pointers and int32
  scalars only, Q/K/V quantized in registers from k_mean and v_amax, no scratch memory. This is the
  kernel the TensorRT AOT plugin embeds as PTX. Quantizing a K block inside every program that visits
  it repeats work but is the same arithmetic as quantizing it once beforehand.
- `_sagesla_fwd_prequant_kernel`: the same attention loop over tensors the two quantization kernels
  produced first (the torch fast path: each K/V block is quantized once, not once per visit).

Both attention kernels run one program per (query block, batch*head), walk the kept key blocks of
`block_idx` with an online softmax in base 2 and mask the padding of a partial last key block.
Numerics follow `sagesla_sparse_attention` operation by operation (IEEE divisions via `div_rn`,
one-rounding fma for the exponent argument, fp16 rounding of the sm80 path's per-block P.V); only
exp2's last-ulp rounding and dot summation order differ on a GPU.

Interpreter. Triton fixes at import time whether `@triton.jit` (its own `tl.max`, `tl.sum`, ... too)
builds GPU kernels or CPU interpreter kernels, from TRITON_INTERPRET. With it set, these kernels run on
CPU tensors (how the tests check them); without it they compile, which AOT compilation needs. The
interpreter's fp32->fp8/bf16 casts do not round to nearest even (ties go up, fp8 subnormals truncate)
and its bf16 dots read raw bits, so every kernel takes an INTERPRET constexpr that pre-rounds those
casts in fp32 (the cast is then exact) and upcasts bf16 dot operands; GPU builds leave it False and
use the hardware's round-to-nearest-even conversions.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from turbotrt.core import sagesla as C

# Kernel constants (module globals a @triton.jit function reads must be constexpr).
_INT8_MAX = tl.constexpr(C.INT8_MAX)
_INT8_SCALE_EPS = tl.constexpr(C.INT8_SCALE_EPS)
_V_FP8_RANGE = tl.constexpr(C.V_FP8_RANGE)
_FP8_MAX = tl.constexpr(C.FP8_E4M3_MAX)
_S_FP8_OFFSET = tl.constexpr(C.S_FP8_OFFSET)

QUANT_CODES = {"none": 0, "int8_fp8": 1, "int8_fp16": 2}  # the kernels' QUANT constexpr
_MAGIC_RNE = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 to an integer, ties to even


def interpreted() -> bool:
    """True when this module's kernels are interpreter kernels (CPU tensors), False for GPU kernels."""
    return not isinstance(_sagesla_fwd_kernel, triton.runtime.JITFunction)


def qk_scale_log2(sm_scale: float) -> float:
    """fp32(sm_scale) * fp32(log2 e), rounded once in fp32 as the reference does; an exact fp32 value."""
    return float(np.float32(sm_scale) * np.float32(C.LOG2E))


def dot_precision(dtype) -> str:
    """The float path's dot precision (torch dtype or its name): IEEE for fp32 inputs (TF32 would cost
    ~1e-3 relative error); fp16/bf16 operands use their native tensor-core dots whatever this says."""
    return "ieee" if str(dtype).removeprefix("torch.") == "float32" else "tf32"


def default_num_warps(block_q: int, head_dim: int) -> int:
    # One warp per 16 query rows, as SpargeAttn's kernels do; the accumulator stays in registers.
    return max(4, block_q // 16) if head_dim >= 128 else 4


# --- shared device helpers ----------------------------------------------------------------------------

@triton.jit
def _quant_tile_int8(x, EXACT_DIV: tl.constexpr):
    """fp32 tile (padding already zero) -> (int8 tile, fp32 scale): amax/127 + 1e-7, x/scale rounded
    half away from zero (+-0.5 then truncation).

    EXACT_DIV: x/scale as an IEEE division. Otherwise from the correctly rounded reciprocal r:
    t = x*r is within an ulp of the quotient, and one correction t + (x - t*scale)*r (two fmas, the
    residual exact) rounds to the correctly rounded quotient (Markstein's theorem), for a multiply and
    two fmas instead of a full division per element: the fused kernel quantizes every K block it
    visits this way.
    """
    scale = tl.math.div_rn(tl.max(tl.abs(x)), _INT8_MAX) + _INT8_SCALE_EPS
    if EXACT_DIV:
        t = tl.math.div_rn(x, scale)
    else:
        r = tl.math.div_rn(1.0, scale)
        t = x * r
        t = tl.fma(tl.fma(-t, scale, x), r, t)
    t = t + tl.where(t >= 0, 0.5, -0.5)
    return t.to(tl.int8), scale


@triton.jit
def _v_fp8_recip(amax):
    # The reference's `2.25 / amax` is torch's __rtruediv__: reciprocal, then a multiply (two roundings).
    return tl.where(amax > 0, tl.math.div_rn(1.0, tl.where(amax > 0, amax, 1.0)) * _V_FP8_RANGE, 0.0)


@triton.jit
def _rne_e4m3_f32(x):
    """x (|x| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 e4m3 is subnormal: a fixed step of 2^-9
    ulp = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e); both products are exact
    r = ((tl.abs(x) * inv + _MAGIC_RNE) - _MAGIC_RNE) * ulp
    return tl.where(bits < 0, -r, r)  # keep the sign of values that round to zero


@triton.jit
def _rne_bf16_f32(x):
    """x rounded to the nearest bf16, ties to even, still in fp32 (finite x)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even (the interpreter's own casts don't: pre-round)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            x = _rne_bf16_f32(x)
        elif dtype == tl.float8e4nv:
            x = _rne_e4m3_f32(x)
    return x.to(dtype)


@triton.jit
def _to_e4m3(x, INTERPRET: tl.constexpr):
    # Saturate to +-448 first, as cvt.rn.satfinite does: e4m3fn has no inf.
    return _cast(tl.clamp(x, -_FP8_MAX, _FP8_MAX), tl.float8e4nv, INTERPRET)


@triton.jit
def _sage_step(acc, m_i, l_i, dot, scale, key_ok, vq, V_FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """One kept key block of the low-bit online softmax (all state fp32, base 2).

    dot: exact int32 Q.K products as fp32 [BQ, BK]; scale = sm_scale*log2e * sq * sk; vq: [BK, D] V
    in e4m3 (V_FP8) or fp16. P = exp2(dot*scale - m + 8.807) for FP8 so the row max lands near 448
    before the e4m3 cast (0 offset for fp16, where P <= 1).
    """
    m_new = tl.maximum(m_i, tl.max(tl.where(key_ok[None, :], dot, float("-inf")), 1) * scale)
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
    if V_FP8:
        shift = _S_FP8_OFFSET - m_new
    else:
        shift = 0.0 - m_new
    p = tl.math.exp2(tl.fma(dot, scale, shift[:, None]))
    p = tl.where(key_ok[None, :], p, 0.0)
    if V_FP8:
        l_i = l_i * alpha + tl.sum(p, 1)  # from the unrounded P
        pv = tl.dot(_to_e4m3(p, INTERPRET), vq)  # fp32 accumulation
    else:
        p16 = p.to(tl.float16)
        l_i = l_i * alpha + tl.sum(p16.to(tl.float32), 1)  # from the rounded P
        pv = tl.dot(p16, vq).to(tl.float16).to(tl.float32)  # the block's P.V rounds to fp16 once
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _float_step(acc, m_i, l_i, qk, key_ok, v, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One kept key block of exact softmax attention (quant="none"); qk already in log2 units."""
    qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _store_out(Out, base, offs_q, offs_d, L, acc, l_i, v_scale, D: tl.constexpr, INTERPRET: tl.constexpr):
    # The reference multiplies by the reciprocal of the row sum, then by the per-channel V scale.
    o = acc * tl.math.div_rn(1.0, l_i)[:, None] * v_scale[None, :]
    tl.store(Out + base + offs_q[:, None] * D + offs_d[None, :], _cast(o, Out.dtype.element_ty, INTERPRET),
             mask=(offs_q < L)[:, None])


# --- quantization kernels -----------------------------------------------------------------------------

@triton.jit
def _quant_int8_kernel(X, Mean, Xq, Scale, L, BLOCK: tl.constexpr, D: tl.constexpr, SMOOTH: tl.constexpr,
                       INTERPRET: tl.constexpr = False):
    """Grid (ceil(L/BLOCK), B*H): one block of tokens of x [B,H,L,D] -> int8 and one fp32 scale.

    SMOOTH (K): subtract Mean [B,H,1,D] (fp32 mean over L), rounding the mean and the difference to
    x's dtype as the reference does, and keep padding rows zero so they never raise the amax.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = (offs_n < L)[:, None]
    ptrs = bh * L * D + offs_n[:, None] * D + offs_d[None, :]
    x = tl.load(X + ptrs, mask=valid, other=0.0).to(tl.float32)
    if SMOOTH:
        xt = X.dtype.element_ty
        mean = _cast(tl.load(Mean + bh * D + offs_d), xt, INTERPRET).to(tl.float32)
        x = tl.where(valid, _cast(x - mean[None, :], xt, INTERPRET).to(tl.float32), 0.0)
    x8, scale = _quant_tile_int8(x, True)
    tl.store(Xq + ptrs, x8, mask=valid)
    tl.store(Scale + bh * tl.num_programs(0) + pid, scale)


@triton.jit
def _quant_v_kernel(V, VAmax, Vq, VScale, L, BLOCK: tl.constexpr, D: tl.constexpr, V_FP8: tl.constexpr,
                    INTERPRET: tl.constexpr = False):
    """Grid (ceil(L/BLOCK), B*H): V [B,H,L,D] -> e4m3 scaled into +-2.25 per channel, or fp16.

    VAmax [B,H,1,D] is max|v| over L per channel; VScale [B,H,D] gets amax/2.25 (ones for fp16).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    valid = (offs_n < L)[:, None]
    ptrs = bh * L * D + offs_n[:, None] * D + offs_d[None, :]
    v = tl.load(V + ptrs, mask=valid, other=0.0).to(tl.float32)
    if V_FP8:
        amax = tl.load(VAmax + bh * D + offs_d)
        tl.store(Vq + ptrs, _to_e4m3(v * _v_fp8_recip(amax)[None, :], INTERPRET), mask=valid)
        v_scale = tl.math.div_rn(amax, _V_FP8_RANGE)
    else:
        tl.store(Vq + ptrs, v.to(tl.float16), mask=valid)
        v_scale = tl.full([D], 1.0, tl.float32)
    if pid == 0:
        tl.store(VScale + bh * D + offs_d, v_scale)


# --- attention kernels --------------------------------------------------------------------------------

@triton.jit
def _sagesla_fwd_kernel(
    # inputs, in the contract's order
    Q, K, V, BlockIdx, KMean, VAmax,
    # int32 scalars: sequence length and n, the kept key blocks per query block
    L, N_SEL,
    # output
    Out,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
    QUANT: tl.constexpr,  # 0 none, 1 int8_fp8, 2 int8_fp16
    QK_SCALE: tl.constexpr,  # fp32(sm_scale) * fp32(log2 e)
    DOT_PRECISION: tl.constexpr = "ieee",  # none path, fp32 inputs: no TF32
    INTERPRET: tl.constexpr = False,
):
    """The contract's op in one launch, grid (ceil(L/BLOCK_Q), B*H). No scratch, no TMA: an AOT plugin
    passes exactly (inputs..., L, N_SEL, Out)."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_q = tl.cdiv(L, BLOCK_Q)
    base = bh * L * D
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    idx_ptr = BlockIdx + (bh * n_q + pid_q) * N_SEL
    xt = Q.dtype.element_ty
    UPCAST: tl.constexpr = INTERPRET and xt == tl.bfloat16

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)
    q = tl.load(Q + base + offs_q[:, None] * D + offs_d[None, :], mask=(offs_q < L)[:, None], other=0.0)

    if QUANT == 0:
        if UPCAST:
            q = q.to(tl.float32)
        for j in range(N_SEL):
            kb = tl.load(idx_ptr + j)
            tok = kb * BLOCK_K + offs_k
            key_ok = tok < L
            kt = tl.load(K + base + tok[None, :] * D + offs_d[:, None], mask=key_ok[None, :], other=0.0)
            v = tl.load(V + base + tok[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * QK_SCALE
            acc, m_i, l_i = _float_step(acc, m_i, l_i, qk, key_ok, v, UPCAST, DOT_PRECISION)
        v_scale = tl.full([D], 1.0, tl.float32)
    else:
        q8, sq = _quant_tile_int8(q.to(tl.float32), True)  # padding rows loaded as zero; once per program
        k_mean = _cast(tl.load(KMean + bh * D + offs_d), xt, INTERPRET).to(tl.float32)
        if QUANT == 1:
            v_amax = tl.load(VAmax + bh * D + offs_d)
            v_recip = _v_fp8_recip(v_amax)
            v_scale = tl.math.div_rn(v_amax, _V_FP8_RANGE)
        else:
            v_scale = tl.full([D], 1.0, tl.float32)
        for j in range(N_SEL):
            kb = tl.load(idx_ptr + j)
            tok = kb * BLOCK_K + offs_k
            key_ok = tok < L
            # K^T tile [D, BK]: smooth, zero the padding, quantize (amax over the tile as for [BK, D]).
            kt = tl.load(K + base + tok[None, :] * D + offs_d[:, None], mask=key_ok[None, :], other=0.0)
            ks = _cast(kt.to(tl.float32) - k_mean[:, None], xt, INTERPRET).to(tl.float32)
            k8, sk = _quant_tile_int8(tl.where(key_ok[None, :], ks, 0.0), False)
            v = tl.load(V + base + tok[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            if QUANT == 1:
                vq = _to_e4m3(v.to(tl.float32) * v_recip[None, :], INTERPRET)
            else:
                vq = v.to(tl.float16)
            dot = tl.dot(q8, k8).to(tl.float32)  # int32 accumulate; |dot| < 2^24 so the cast is exact
            acc, m_i, l_i = _sage_step(acc, m_i, l_i, dot, QK_SCALE * (sq * sk), key_ok, vq, QUANT == 1, INTERPRET)
    _store_out(Out, base, offs_q, offs_d, L, acc, l_i, v_scale, D, INTERPRET)


@triton.jit
def _sagesla_fwd_prequant_kernel(
    Q8, K8, Vq, QScale, KScale, VScale, BlockIdx, L, N_SEL, Out,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
    V_FP8: tl.constexpr, QK_SCALE: tl.constexpr, INTERPRET: tl.constexpr = False,
):
    """`_sagesla_fwd_kernel`'s low-bit loop over pre-quantized q8/k8 (int8), Vq (e4m3 or fp16) and
    their scales QScale [B,H,Nq], KScale [B,H,Nk], VScale [B,H,D]."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_q = tl.cdiv(L, BLOCK_Q)
    n_k = tl.cdiv(L, BLOCK_K)
    base = bh * L * D
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    idx_ptr = BlockIdx + (bh * n_q + pid_q) * N_SEL

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)
    q8 = tl.load(Q8 + base + offs_q[:, None] * D + offs_d[None, :], mask=(offs_q < L)[:, None], other=0)
    sq = tl.load(QScale + bh * n_q + pid_q)
    for j in range(N_SEL):
        kb = tl.load(idx_ptr + j)
        tok = kb * BLOCK_K + offs_k
        key_ok = tok < L
        k8 = tl.load(K8 + base + tok[None, :] * D + offs_d[:, None], mask=key_ok[None, :], other=0)
        vq = tl.load(Vq + base + tok[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        sk = tl.load(KScale + bh * n_k + kb)
        dot = tl.dot(q8, k8).to(tl.float32)
        acc, m_i, l_i = _sage_step(acc, m_i, l_i, dot, QK_SCALE * (sq * sk), key_ok, vq, V_FP8, INTERPRET)
    _store_out(Out, base, offs_q, offs_d, L, acc, l_i, tl.load(VScale + bh * D + offs_d), D, INTERPRET)


# --- host wrappers ------------------------------------------------------------------------------------

def quantize_per_block_int8(x: torch.Tensor, block: int, mean: torch.Tensor | None = None):
    """`turbotrt.models.attention.quantize_per_block_int8` on the device: x `[B,H,L,D]` -> (int8 `[B,H,L,D]`, fp32 `[B,H,N]`).

    `mean` (`[B,H,1,D]` fp32, the mean of x over L) turns on K smoothing; the reference computes the
    same mean itself (`smooth=True`).
    """
    B, H, L, D = x.shape
    x = x.contiguous()
    n = C.cdiv(L, block)
    x8 = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(B, H, n, dtype=torch.float32, device=x.device)
    smooth = mean is not None
    mean = mean.float().contiguous() if smooth else scale  # unread when not smoothing
    _quant_int8_kernel[(n, B * H)](x, mean, x8, scale, L, BLOCK=block, D=D, SMOOTH=smooth,
                                   INTERPRET=interpreted(), enable_fp_fusion=False)
    return x8, scale


def quantize_v_per_channel(v: torch.Tensor, v_amax: torch.Tensor, v_dtype: str = "fp8", block: int = 64):
    """`turbotrt.models.attention.quantize_v_per_channel` on the device, given `v_amax` `[B,H,1,D]` (max |v| over L)."""
    if v_dtype not in C.V_DTYPES:
        raise ValueError(f"unknown v_dtype {v_dtype!r}; valid: {', '.join(C.V_DTYPES)}")
    B, H, L, D = v.shape
    v = v.contiguous()
    fp8 = v_dtype == "fp8"
    vq = torch.empty(v.shape, dtype=torch.float8_e4m3fn if fp8 else torch.float16, device=v.device)
    scale = torch.empty(B, H, D, dtype=torch.float32, device=v.device)
    _quant_v_kernel[(C.cdiv(L, block), B * H)](v, v_amax.float().contiguous(), vq, scale, L,
                                               BLOCK=block, D=D, V_FP8=fp8, INTERPRET=interpreted(),
                                               enable_fp_fusion=False)
    return vq, scale


def sagesla_forward(q, k, v, block_idx, k_mean, v_amax, block_q: int, block_k: int, sm_scale: float,
                    quant: str = "none", fused: bool = False, num_warps: int | None = None,
                    num_stages: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """o_s of the contract (written into `out` when given). quant "none" and `fused=True` launch
    `_sagesla_fwd_kernel` (the AOT kernel); otherwise Q/K/V are quantized by their own kernels first and
    the prequant kernel runs."""
    if quant not in QUANT_CODES:
        raise ValueError(f"unknown SageSLA quant mode {quant!r}; valid: {', '.join(QUANT_CODES)}")
    B, H, L, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_idx = block_idx.to(torch.int32).contiguous()
    n_sel = block_idx.shape[-1]
    out = torch.empty_like(q) if out is None else out
    grid = (C.cdiv(L, block_q), B * H)
    # No fp contraction: the reference rounds every product and sum separately.
    # One pipeline stage where 16-bit or in-register-quantized tiles make stages expensive in shared
    # memory (sm80/86 have ~100 KiB); two for the prequant loop's 8-bit K/V tiles.
    prequant = quant != "none" and not fused
    opts = dict(num_warps=num_warps or default_num_warps(block_q, D), enable_fp_fusion=False,
                num_stages=num_stages or (2 if prequant else 1))
    scale = qk_scale_log2(sm_scale)
    if not prequant:
        _sagesla_fwd_kernel[grid](q, k, v, block_idx, k_mean.float().contiguous(), v_amax.float().contiguous(),
                                  L, n_sel, out, BLOCK_Q=block_q, BLOCK_K=block_k, D=D,
                                  QUANT=QUANT_CODES[quant], QK_SCALE=scale,
                                  DOT_PRECISION=dot_precision(q.dtype), INTERPRET=interpreted(), **opts)
        return out
    q8, sq = quantize_per_block_int8(q, block_q)
    k8, sk = quantize_per_block_int8(k, block_k, mean=k_mean)
    vq, vs = quantize_v_per_channel(v, v_amax, C.QUANT_MODES[quant], block=block_k)
    _sagesla_fwd_prequant_kernel[grid](q8, k8, vq, sq, sk, vs, block_idx, L, n_sel, out,
                                       BLOCK_Q=block_q, BLOCK_K=block_k, D=D, V_FP8=quant == "int8_fp8",
                                       QK_SCALE=scale, INTERPRET=interpreted(), **opts)
    return out
