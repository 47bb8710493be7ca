"""Self-attention of the TurboDiffusion DiT in three swappable modes: the reference math.

Every later implementation (Triton kernels, the ONNX custom op, the TensorRT plugin) is checked
against this file, so each function is explicit about its numerics. Functional APIs take
`[B, H, L, D]`; `AttentionOp` takes Wan's `[B, L, H, D]`. Everything is computed in fp32 and
returned in the input dtype.

Modes
- `dense`:   softmax(q k^T D^-0.5) v. `proj_l` exists (checkpoints carry it) but is unused.
- `sla`:     o = o_s + proj_l(o_l). o_s is softmax attention restricted to the key blocks that
             `block_map` keeps for each query block; o_l is linear attention over all keys.
- `sagesla`: as `sla`, with o_s from an emulation of SpargeAttn's low-bit block-sparse kernel
             (INT8 Q/K, FP8 or FP16 P and V) that TurboDiffusion runs as SageSLA.

Upstream sources: TurboDiffusion `turbodiffusion/SLA/{core,utils,kernel}.py` (SLA is the same code
as the SLA repository's `sparse_linear_attention/`, except that TurboDiffusion's module takes
`[B, L, H, D]`); SpargeAttn `spas_sage_attn/utils.py` (`get_vanilla_qk_quant`,
`block_map_lut_triton`), `csrc/fused/fused.cu` (V quantization), `csrc/qattn/attn_utils.cuh` and
`qk_int_sv_f8_cuda_sm89.cuh` / `_sm90.cuh` / `qk_int_sv_f16_cuda_sm80.cuh` (the sparse kernels).
Upstream runs on bf16 activations: the block map, the linear branch, proj_l and SLA's Triton
kernel (which also rounds P to bf16 before P.V) all round to bf16; here they are fp32, the exact
math that bf16 approximates. The SageSLA emulation mirrors its kernel's low-bit numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbotrt.core import sagesla as C
from turbotrt.core.configs import AttentionConfig

LINEAR_EPS = 1e-5  # denominator guard of the linear branch
# The op's own constants (block quantization, FP8 ranges, the top-k count rule) live in its contract,
# `turbotrt.core.sagesla` (imported as C), which the Triton kernels read too.


# --- helpers --------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"self-attention needs q, k, v of one shape [B, H, L, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )


def _pad_tokens(x: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad dim -2 of `[B, H, L, D]` to a multiple of `block`."""
    pad = _cdiv(x.shape[-2], block) * block - x.shape[-2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """`[B, H, L, D]` -> `[B, H, N, block, D]`, the last block zero-padded."""
    B, H, _, D = x.shape
    return _pad_tokens(x, block).reshape(B, H, -1, block, D)


def _key_valid(length: int, block: int, device) -> torch.Tensor:
    """`[Nk, block]` bool: which slots of each key block hold a real token (False in the padding)."""
    return (torch.arange(_cdiv(length, block) * block, device=device) < length).reshape(-1, block)


def _gather_blocks(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """xb `[B, H, N, blk, D]`, idx `[B, H, M]` -> `[B, H, M, blk, D]` (block idx[b, h, m] of xb[b, h])."""
    B, H, _, blk, D = xb.shape
    return torch.gather(xb, 2, idx[..., None, None].expand(B, H, idx.shape[-1], blk, D))


def _check_block_idx(block_idx: torch.Tensor, q: torch.Tensor, block_q: int, block_k: int) -> None:
    B, H, L, _ = q.shape
    nq, nk = _cdiv(L, block_q), _cdiv(L, block_k)
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, H, nq) or block_idx.shape[-1] < 1:
        raise ValueError(f"block_idx must be [B, H, Nq, n>=1] = [{B}, {H}, {nq}, n]; got {tuple(block_idx.shape)}")
    if block_idx.dtype.is_floating_point or block_idx.dtype == torch.bool:
        raise ValueError(f"block_idx must hold integer key-block indices, got {block_idx.dtype}")
    if block_idx.min() < 0 or block_idx.max() >= nk:
        raise ValueError(f"block_idx values must lie in [0, {nk}) for L={L}, block_k={block_k}")
    if block_idx.shape[-1] > 1 and (block_idx.sort(dim=-1).values.diff(dim=-1) == 0).any():
        raise ValueError("block_idx repeats a key block within a row")


# --- block selection ------------------------------------------------------------------------------

def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of tokens; a partial last block divides by its real token count."""
    L = x.shape[-2]
    sums = _blocks(x, block).sum(dim=-2)  # zero padding adds nothing
    counts = (L - torch.arange(sums.shape[-2], device=x.device) * block).clamp(max=block)
    return sums / counts.to(sums.dtype)[:, None]


def block_map(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, topk: float) -> torch.Tensor:
    """Kept key blocks per query block: LongTensor `[B, H, Nq, n]`, each row sorted ascending.

    score = mean_pool(q) @ mean_pool(k - mean_L(k))^T, no scale, no softmax; the n = `C.kept_blocks`
    best per row are kept (n = `sagesla.kept_blocks`). Smoothing K adds a per-row constant to the scores, so it cannot change
    the ranking in exact arithmetic; upstream does it to keep a large shared offset from swamping
    bf16 scores. Computed in fp32 here (upstream: bf16 activations, fp32 sums), so near-ties may
    break differently: kernels are compared given the same `block_idx`.
    Ascending order is what SpargeAttn's kernel iterates (its LUT is built by scanning the block
    map), and it makes a partial last key block the final iteration, the only one upstream masks.
    """
    _check_qkv(q, k, k)
    q32, k32 = q.float(), k.float()
    pooled_q = _mean_pool(q32, block_q)
    pooled_k = _mean_pool(k32 - k32.mean(dim=-2, keepdim=True), block_k)
    score = pooled_q @ pooled_k.transpose(-1, -2)  # [B, H, Nq, Nk]
    n = C.kept_blocks(score.shape[-1], topk)
    return score.topk(n, dim=-1, sorted=False).indices.sort(dim=-1).values


# --- fp32 branches --------------------------------------------------------------------------------

def _dense(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=q.shape[-1] ** -0.5)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * D^-0.5) v over all keys, `[B, H, L, D]`."""
    _check_qkv(q, k, v)
    return _dense(q, k, v).to(q.dtype)


# Gathered keys per chunk of query blocks stay under this many elements (64 MiB in fp32).
_GATHER_BUDGET = 1 << 24


def _sparse(q, k, v, block_idx, block_q: int, block_k: int) -> torch.Tensor:
    B, H, L, D = q.shape
    qb = _blocks(q.float(), block_q)  # [B, H, Nq, bq, D]
    kb, vb = _blocks(k.float(), block_k), _blocks(v.float(), block_k)  # [B, H, Nk, bk, D]
    valid = _key_valid(L, block_k, q.device)  # [Nk, bk]
    nq, n = qb.shape[2], block_idx.shape[-1]
    chunk = max(1, _GATHER_BUDGET // (B * H * n * block_k * D))
    out = []
    for i0 in range(0, nq, chunk):
        idx = block_idx[:, :, i0:i0 + chunk].long()  # [B, H, c, n]
        c = idx.shape[2]
        keys = _gather_blocks(kb, idx.reshape(B, H, c * n)).reshape(B, H, c, n * block_k, D)
        vals = _gather_blocks(vb, idx.reshape(B, H, c * n)).reshape(B, H, c, n * block_k, D)
        ok = valid[idx].reshape(B, H, c, 1, n * block_k)
        s = (qb[:, :, i0:i0 + c] @ keys.transpose(-1, -2)) * D**-0.5  # [B, H, c, bq, n*bk]
        p = s.masked_fill(~ok, float("-inf")).softmax(dim=-1)  # padding of a partial block: weight 0
        out.append(p @ vals)
    return torch.cat(out, dim=2).reshape(B, H, nq * block_q, D)[:, :, :L]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                     block_q: int, block_k: int) -> torch.Tensor:
    """o_s: exact softmax(q k^T * D^-0.5) v restricted to the kept key blocks of each query block.

    block_idx `[B, H, Nq, n]` lists, for query block i, the key blocks it attends to (tokens
    [j*block_k, (j+1)*block_k) clipped to L). Not an online softmax: one softmax over the gathered
    keys, so the result does not depend on the order of block_idx.
    """
    _check_qkv(q, k, v)
    _check_block_idx(block_idx, q, block_q, block_k)
    return _sparse(q, k, v, block_idx, block_q, block_k).to(q.dtype)


def _linear(q, k, v) -> torch.Tensor:
    phi_q, phi_k = q.float().softmax(dim=-1), k.float().softmax(dim=-1)  # feature map over head_dim
    kv = phi_k.transpose(-1, -2) @ v.float()  # [B, H, D, D]: all keys summed once
    k_sum = phi_k.sum(dim=-2, keepdim=True)  # [B, H, 1, D]
    return (phi_q @ kv) / (LINEAR_EPS + (phi_q * k_sum).sum(dim=-1, keepdim=True))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o_l (before proj_l): phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum_L phi(k)), phi = softmax over D."""
    _check_qkv(q, k, v)
    return _linear(q, k, v).to(q.dtype)


# --- SageSLA quantizers ---------------------------------------------------------------------------

def quantize_per_block_int8(x: torch.Tensor, block: int, smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per (batch, head, block of `block` tokens), as SpargeAttn's `qk_quantize` Triton kernel.

    Returns `x_int8 [B, H, L, D]` and `scale [B, H, ceil(L/block)]` (fp32), x ~= x_int8 * scale.
    - smooth (for K): subtract the mean over all L tokens first; like upstream, the mean and the
      difference are rounded to x's dtype (no-ops for fp32 input). Padding rows stay zero.
    - scale = amax / 127 + 1e-7 in fp32 (the epsilon keeps all-zero blocks finite). No softmax scale
      is folded in (SageAttention's own Triton quantizer folds D^-0.5 * log2(e) into Q; the
      SpargeAttn path TurboDiffusion runs applies it after the integer dot).
    - x / scale, then + 0.5 * sign and truncate: round half away from zero, done in fp32 exactly as
      upstream, so |x_int8| <= 127. (Upstream's GPU division is approximate; IEEE here.)
    """
    if x.dim() != 4:
        raise ValueError(f"expected [B, H, L, D], got {tuple(x.shape)}")
    L = x.shape[-2]
    x32 = x.float()
    if smooth:
        mean = x32.mean(dim=-2, keepdim=True).to(x.dtype).float()
        x32 = (x32 - mean).to(x.dtype).float()
    xb = _blocks(x32, block)  # padding is zero, so it never raises amax
    scale = xb.abs().amax(dim=(-2, -1)) / C.INT8_MAX + C.INT8_SCALE_EPS  # [B, H, N]
    t = xb / scale[..., None, None]
    t = t + 0.5 * torch.where(t >= 0, 1.0, -1.0)
    x_int8 = t.trunc().to(torch.int8).flatten(2, 3)[:, :, :L]
    return x_int8, scale


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    # cvt.rn.satfinite: round to nearest even, saturate to +-448.
    return x.clamp(-C.FP8_E4M3_MAX, C.FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_v_per_channel(v: torch.Tensor, v_dtype: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """V for the sparse kernel: returns `v_q [B, H, L, D]` and `scale [B, H, D]` (fp32), v ~= v_q * scale.

    fp8 (SpargeAttn `scale_fuse_quant_cuda` with scale_max 2.25): per (batch, head, channel)
    amax over all tokens; scale = amax / 2.25 and v_q = e4m3(v * (2.25 / amax)), the reciprocal taken
    as upstream does. A channel with amax 0 quantizes to zeros (upstream divides by zero: NaN).
    fp16 (sm80 path): v_q = fp16(v) and no scale (ones returned so callers need no special case).
    """
    if v_dtype not in C.V_DTYPES:
        raise ValueError(f"unknown v_dtype {v_dtype!r}; valid: {', '.join(C.V_DTYPES)}")
    v32 = v.float()
    if v_dtype == "fp16":
        return v32.to(torch.float16), torch.ones(v.shape[:2] + v.shape[-1:], dtype=torch.float32, device=v.device)
    amax = v32.abs().amax(dim=-2)  # [B, H, D]
    scale = amax / C.V_FP8_RANGE
    recip = torch.where(amax > 0, C.V_FP8_RANGE / amax, torch.zeros_like(amax))
    return _to_e4m3(v32 * recip[..., None, :]), scale


# --- SageSLA sparse branch ------------------------------------------------------------------------

def _fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fmaf(a, b, c): one rounding. a*b is exact in float64 here (a is an integer < 2^22, b has
    24 significant bits); the sum rounds in float64 and then to fp32, which equals a single rounding
    except in vanishingly rare double-rounding ties."""
    return (a.double() * b.double() + c.double()).float()


def _sagesla_sparse(q, k, v, block_idx, block_q: int, block_k: int, v_dtype: str) -> torch.Tensor:
    B, H, L, D = q.shape
    q8, sq = quantize_per_block_int8(q, block_q)  # sq [B, H, Nq]
    k8, sk = quantize_per_block_int8(k, block_k, smooth=True)  # sk [B, H, Nk]
    v_q, v_scale = quantize_v_per_channel(v, v_dtype)
    fp8 = v_dtype == "fp8"

    # int8 values as fp32: |q8 . k8| <= 127 * 127 * 128 < 2^24, so every partial sum is an integer
    # that fp32 holds exactly and the dot equals upstream's int32 MMA in any summation order.
    qb = _blocks(q8.float(), block_q)  # [B, H, Nq, bq, D]
    kb = _blocks(k8.float(), block_k)  # [B, H, Nk, bk, D]
    vb = _blocks(v_q.float(), block_k)  # fp8/fp16 -> fp32 is exact
    valid = _key_valid(L, block_k, q.device)
    nq = qb.shape[2]

    # Upstream: sm_scale = fp32(D^-0.5) * log2e in fp32, then times fp32(q_scale * k_scale) per block.
    sm_scale = torch.tensor(D**-0.5, dtype=torch.float32) * torch.tensor(C.LOG2E, dtype=torch.float32)
    offset = torch.tensor(C.S_FP8_OFFSET if fp8 else 0.0, dtype=torch.float32)  # sm80 path: P <= 1, no offset

    # Upstream starts from m = -5e6 and l = 1; the first block's alpha = 0 erases either start.
    m = torch.full((B, H, nq, block_q), float("-inf"), device=q.device)  # running max of s, log2 units
    l = torch.zeros(B, H, nq, block_q, device=q.device)  # running row sum of P
    acc = torch.zeros(B, H, nq, block_q, D, device=q.device)  # running P.V (unscaled by v_scale)
    order = block_idx.long().sort(dim=-1).values  # ascending, as upstream's LUT
    for j in range(order.shape[-1]):
        idx = order[..., j]  # [B, H, Nq]: the j-th kept key block of every query block
        keys, vals = _gather_blocks(kb, idx), _gather_blocks(vb, idx)  # [B, H, Nq, bk, D]
        ok = valid[idx][..., None, :]  # [B, H, Nq, 1, bk]
        scale = (sm_scale * (sq * torch.gather(sk, 2, idx)))[..., None, None]  # [B, H, Nq, 1, 1]
        dot = qb @ keys.transpose(-1, -2)  # [B, H, Nq, bq, bk], exact integers
        # Max before exponentiation; max(dot) * scale == max(dot * scale) in fp32 (monotone rounding).
        m_new = torch.maximum(m, dot.masked_fill(~ok, float("-inf")).amax(dim=-1) * scale[..., 0])
        alpha = torch.exp2(m - m_new)  # 0 on the first block (m = -inf)
        # p = exp2(fmaf(dot, scale, offset - m)): the offset puts the row max at ~448 before the cast.
        p = torch.exp2(_fma_f32(dot, scale, (offset - m_new)[..., None])).masked_fill(~ok, 0.0)
        if fp8:
            # Row sum from the unrounded fp32 P (CUDA-core accumulate_d); P.V from e4m3 P and V with
            # fp32 accumulation within the block (sm90 wgmma; sm89 without the fp16-accumulate build).
            l = l * alpha + p.sum(dim=-1)
            pv = _to_e4m3(p).float() @ vals
        else:
            # sm80: P rounded to fp16 and summed from the rounded values (tensor-core row sum); the
            # block's P.V accumulates in fp16 before joining the fp32 accumulator (one rounding here).
            p16 = p.to(torch.float16).float()
            l = l * alpha + p16.sum(dim=-1)
            pv = (p16 @ vals).to(torch.float16).float()
        acc = acc * alpha[..., None] + pv  # rescale, then add the block's partial (inst_buf)
        m = m_new

    out = acc * (1.0 / l)[..., None]  # upstream multiplies by the reciprocal of the row sum
    out = out * v_scale[:, :, None, None, :]  # V dequant per channel, after normalisation
    return out.reshape(B, H, nq * block_q, D)[:, :, :L]


def sagesla_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                             block_q: int, block_k: int, v_dtype: str = "fp8") -> torch.Tensor:
    """Emulation of SpargeAttn's block-sparse SageAttention kernel (TurboDiffusion's SageSLA o_s).

    Per query block, over its kept key blocks in ascending order (an online softmax in base 2):
      s   = (q8 . k8) * sq * sk * D^-0.5 * log2(e)      q8/k8 INT8 per block, K mean-smoothed
      m'  = max(m, rowmax(s));  alpha = exp2(m - m')
      P   = exp2(s - m' + 8.807)  (fp8; 0 for fp16)     fp32, masked to 0 beyond L
      l   = l * alpha + rowsum(P)                       fp8: unrounded P; fp16: rounded P
      acc = acc * alpha + cast(P) @ v_q                  cast: e4m3 (fp8) or fp16
    o_s = acc * (1 / l) * v_scale. The 2^8.807 factor cancels between acc and l. Smoothing K does
    not change the softmax (it shifts each query row's scores by one constant); it only narrows K's
    quantization range.

    Not mirrored (each bounded far below the quantization error): upstream's ex2.approx/rcp.approx
    and fast-math divisions (IEEE here); its last two iterations multiply dot by sq*sk and then by
    the softmax scale (one rounding order for all blocks here); the sm89/sm120 "Sage2++" build
    accumulates each block's fp8 P.V in fp16 (fp32 here); summation order of row sums and MMAs.
    """
    _check_qkv(q, k, v)
    _check_block_idx(block_idx, q, block_q, block_k)
    if q.shape[-1] not in C.HEAD_DIMS:
        raise ValueError(f"sagesla supports head_dim {C.HEAD_DIMS}, got {q.shape[-1]}")
    if v_dtype not in C.V_DTYPES:
        raise ValueError(f"unknown v_dtype {v_dtype!r}; valid: {', '.join(C.V_DTYPES)}")
    return _sagesla_sparse(q, k, v, block_idx, block_q, block_k, v_dtype).to(q.dtype)


# --- dispatch and modules -------------------------------------------------------------------------

def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l: nn.Linear,
                  config: AttentionConfig) -> torch.Tensor:
    """Self-attention `[B, H, L, D]` in `config.mode`: dense, or o_s + proj_l(o_l) (sla / sagesla).

    proj_l is one Linear(D, D) shared by all heads, applied in fp32 whatever its stored dtype.
    """
    _check_qkv(q, k, v)
    if config.mode == "dense":
        return _dense(q, k, v).to(q.dtype)
    idx = block_map(q, k, config.block_q, config.block_k, config.topk)
    if config.mode == "sla":
        o_s = _sparse(q, k, v, idx, config.block_q, config.block_k)
    else:
        if q.shape[-1] not in C.HEAD_DIMS:
            raise ValueError(f"sagesla supports head_dim {C.HEAD_DIMS}, got {q.shape[-1]}")
        o_s = _sagesla_sparse(q, k, v, idx, config.block_q, config.block_k, config.v_dtype)
    bias = None if proj_l.bias is None else proj_l.bias.float()
    o_l = F.linear(_linear(q, k, v), proj_l.weight.float(), bias)
    return (o_s + o_l).to(q.dtype)


class SparseLinearAttention(nn.Module):
    """Holds proj_l (fp32, zero-initialised as in training: a fresh model is its sparse branch).

    forward takes `[B, H, L, D]` (TurboDiffusion's own copy of this module takes `[B, L, H, D]`;
    here `AttentionOp` does the layout change).
    """

    def __init__(self, head_dim: int, config: AttentionConfig | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.config = config or AttentionConfig()
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"head_dim is {self.head_dim}, input has {q.shape[-1]}")
        return sla_attention(q, k, v, self.proj_l, self.config)

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, block_q={c.block_q}, block_k={c.block_k}, topk={c.topk}, v_dtype={c.v_dtype}"


class AttentionOp(nn.Module):
    """`self_attn.attn_op` of the DiT: Wan's `[B, L, H, D]` in and out.

    The child is named `local_attn` so parameters load from TurboDiffusion's
    `blocks.N.self_attn.attn_op.local_attn.proj_l.{weight,bias}`. (Upstream's op returns
    `[B, L, H*D]`; the DiT flattens the heads either way.)
    """

    def __init__(self, head_dim: int, config: AttentionConfig | None = None):
        super().__init__()
        self.local_attn = SparseLinearAttention(head_dim, config)

    @property
    def config(self) -> AttentionConfig:
        return self.local_attn.config

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dim() != 4:
            raise ValueError(f"expected [B, L, H, D], got {tuple(q.shape)}")
        out = self.local_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
