"""The attention reference: block selection, the three modes, the SageSLA quantizers and emulation.

Brute-force references here are written independently of the implementation (Python loops over
blocks, float64 where the point is the math), so a wrong index, mask or formula shows up.
Shapes are small (L of 200 and 331 give partial last blocks in both geometries).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from turbotrt.core.configs import ATTENTION_MODES, AttentionConfig
from turbotrt.core.sagesla import kept_blocks as topk_count
from turbotrt.models.attention import (
    AttentionOp,
    SparseLinearAttention,
    block_map,
    dense_attention,
    linear_attention,
    quantize_per_block_int8,
    quantize_v_per_channel,
    sagesla_sparse_attention,
    sla_attention,
    sparse_attention,
)

GEOMETRIES = [(128, 64), (64, 128)]  # (block_q, block_k): sla / sagesla off sm90, sagesla on sm90
LENGTHS = [200, 331]  # neither is a multiple of 64 or 128: every case has partial last blocks
HEAD_DIMS = [64, 128]
ALL_SHAPES = [(g, L, D) for g in GEOMETRIES for L in LENGTHS for D in HEAD_DIMS]
# For the heavier tests: every geometry meets every length and every head dim once (4 of 8 cases).
SHAPES = [((128, 64), 200, 64), ((128, 64), 331, 128), ((64, 128), 200, 128), ((64, 128), 331, 64)]


def _ids(shapes):
    return [f"{g[0]}x{g[1]}-L{L}-D{D}" for g, L, D in shapes]


def _qkv(L, D, seed=0, B=1, H=2, k_offset=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    # A shared per-channel offset in K, as real keys have: what K smoothing is for.
    k = k + k_offset * torch.randn(D, generator=g)
    return q, k, v


def _spans(L, block):
    return [(s, min(s + block, L)) for s in range(0, L, block)]


# --- config and topk_count ------------------------------------------------------------------------

def test_config_defaults_and_validation():
    c = AttentionConfig()
    assert (c.mode, c.block_q, c.block_k, c.topk, c.v_dtype) == ("sla", 128, 64, 0.1, "fp8")
    assert ATTENTION_MODES == ("dense", "sla", "sagesla")
    assert AttentionConfig("sagesla", topk=1).topk == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mode = "dense"
    with pytest.raises(ValueError, match="dense, sla, sagesla"):
        AttentionConfig("flash")
    for topk in (0, 0.0, -0.1, 1.01, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="topk"):
            AttentionConfig(topk=topk)
    for blk in (0, -64, 64.0, True):
        with pytest.raises(ValueError, match="block_q"):
            AttentionConfig(block_q=blk)
        with pytest.raises(ValueError, match="block_k"):
            AttentionConfig(block_k=blk)
    with pytest.raises(ValueError, match="fp8, fp16"):
        AttentionConfig(v_dtype="int8")


def test_topk_count():
    assert topk_count(4, 0.1) == 1  # int(0.4) == 0: guarded to one block (upstream would give NaN)
    assert topk_count(1, 0.1) == 1
    assert topk_count(10, 0.15) == 1  # int(1.5)
    assert topk_count(30, 0.1) == 3
    assert topk_count(512, 0.1) == 51  # 480p, 64-token key blocks
    assert topk_count(10, 1.0) == 10 and topk_count(7, 1.0) == 7  # ratio 1.0 keeps every block
    with pytest.raises(ValueError):
        topk_count(0, 0.5)


# --- block_map ------------------------------------------------------------------------------------

def _block_map_bruteforce(q, k, bq, bk, topk):
    B, H, L, _ = q.shape
    q, k = q.double(), k.double()
    out = torch.empty(B, H, math.ceil(L / bq), topk_count(math.ceil(L / bk), topk), dtype=torch.long)
    for b in range(B):
        for h in range(H):
            ks = k[b, h] - k[b, h].mean(dim=0)
            kmeans = [ks[s:e].sum(dim=0) / (e - s) for s, e in _spans(L, bk)]
            for i, (s, e) in enumerate(_spans(L, bq)):
                qm = q[b, h, s:e].sum(dim=0) / (e - s)
                scores = [float(qm @ km) for km in kmeans]
                best = sorted(range(len(scores)), key=lambda j: -scores[j])[: out.shape[-1]]
                out[b, h, i] = torch.tensor(sorted(best))
    return out


@pytest.mark.parametrize("geometry,L,D", ALL_SHAPES, ids=_ids(ALL_SHAPES))
def test_block_map_matches_bruteforce(geometry, L, D):
    bq, bk = geometry
    q, k, _ = _qkv(L, D)
    for topk in (0.5, 0.3):
        idx = block_map(q, k, bq, bk, topk)
        assert idx.dtype == torch.long
        assert idx.shape == (1, 2, math.ceil(L / bq), topk_count(math.ceil(L / bk), topk))
        assert (idx.diff(dim=-1) > 0).all()  # ascending, no repeats
        # Exact: random data has no near-ties at the selection boundary (float64 vs fp32 agree).
        assert torch.equal(idx, _block_map_bruteforce(q, k, bq, bk, topk))
    # Smoothing adds a per-row constant to the scores: a shared key offset never changes the map.
    assert torch.equal(block_map(q, k + 3.0, bq, bk, 0.5), block_map(q, k, bq, bk, 0.5))


def test_block_map_partial_key_block_uses_real_count():
    # Four key blocks of 64 tokens, the last holding 8 (L=200). All keys lean along u; the partial
    # block leans hardest. Its pooled mean is the largest only if divided by 8 rather than 64.
    L, D, bk = 200, 64, 64
    g = torch.Generator().manual_seed(1)
    u = torch.randn(D, generator=g)
    coef = torch.tensor([0.55] * 64 + [0.65] * 64 + [0.75] * 64 + [1.0] * 8)
    k = coef[:, None] * u + 0.01 * torch.randn(L, D, generator=g)
    q = u + 0.01 * torch.randn(L, D, generator=g)
    idx = block_map(q[None, None], k[None, None], 64, bk, topk=1.5 / 4)  # keeps one block
    assert idx.shape[-1] == 1 and (idx == 3).all()


# --- dense / sparse / linear ----------------------------------------------------------------------

@pytest.mark.parametrize("geometry,L,D", ALL_SHAPES, ids=_ids(ALL_SHAPES))
def test_sla_with_all_blocks_is_dense_plus_linear(geometry, L, D):
    bq, bk = geometry
    q, k, v = _qkv(L, D)
    idx = block_map(q, k, bq, bk, topk=1.0)
    assert torch.equal(idx, torch.arange(math.ceil(L / bk)).expand_as(idx))
    dense = dense_attention(q, k, v)
    # Same math, different summation order (gathered blocks vs SDPA): fp32 rounding, outputs O(1).
    torch.testing.assert_close(sparse_attention(q, k, v, idx, bq, bk), dense, rtol=1e-5, atol=1e-5)

    proj = nn.Linear(D, D)
    with torch.no_grad():
        proj.weight.normal_(0, 0.5)
        proj.bias.normal_(0, 0.5)
    cfg = AttentionConfig("sla", block_q=bq, block_k=bk, topk=1.0)
    expected = dense + proj(linear_attention(q, k, v))
    torch.testing.assert_close(sla_attention(q, k, v, proj, cfg), expected, rtol=1e-5, atol=1e-5)
    # Dense mode ignores proj_l entirely.
    assert torch.equal(sla_attention(q, k, v, proj, AttentionConfig("dense")), dense)


def _sparse_bruteforce(q, k, v, idx, bq, bk):
    B, H, L, D = q.shape
    out = torch.empty(B, H, L, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i, (s, e) in enumerate(_spans(L, bq)):
                allowed = torch.zeros(L, dtype=torch.bool)
                for j in idx[b, h, i].tolist():
                    allowed[j * bk: (j + 1) * bk] = True  # slicing stops at L: padding is never a key
                scores = q[b, h, s:e].double() @ k[b, h].double().T / math.sqrt(D)
                p = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
                out[b, h, s:e] = p @ v[b, h].double()
    return out


@pytest.mark.parametrize("geometry,L,D", SHAPES, ids=_ids(SHAPES))
def test_sparse_attention_matches_masked_dense(geometry, L, D):
    bq, bk = geometry
    q, k, v = _qkv(L, D, seed=2)
    nq, nk = math.ceil(L / bq), math.ceil(L / bk)
    g = torch.Generator().manual_seed(3)
    for n in sorted({1, max(1, nk // 2)}):
        idx = torch.stack([torch.randperm(nk, generator=g)[:n] for _ in range(2 * nq)]).reshape(1, 2, nq, n)
        idx[0, 0, 0] = torch.arange(nk - n, nk)  # a row that keeps the partial last key block
        got = sparse_attention(q, k, v, idx, bq, bk)
        # fp32 against float64 on O(1) outputs: fp32 softmax/matmul rounding only.
        torch.testing.assert_close(got.double(), _sparse_bruteforce(q, k, v, idx, bq, bk), rtol=1e-5, atol=1e-5)
        # The softmax is taken once over the gathered keys: the order of block_idx cannot matter.
        shuffled = idx[..., torch.randperm(n, generator=g)]
        torch.testing.assert_close(sparse_attention(q, k, v, shuffled, bq, bk), got, rtol=1e-6, atol=1e-6)


def test_sparse_attention_rejects_bad_block_idx():
    q, k, v = _qkv(200, 64)
    with pytest.raises(ValueError, match="block_idx"):
        sparse_attention(q, k, v, torch.zeros(1, 2, 3, 1, dtype=torch.long), 128, 64)  # Nq is 2
    with pytest.raises(ValueError, match="range|lie in"):
        sparse_attention(q, k, v, torch.full((1, 2, 2, 1), 4), 128, 64)  # Nk is 4
    with pytest.raises(ValueError, match="repeats"):
        sparse_attention(q, k, v, torch.zeros(1, 2, 2, 2, dtype=torch.long), 128, 64)


@pytest.mark.parametrize("L,D", [(200, 64), (331, 128)])
def test_linear_attention_matches_explicit_formula(L, D):
    q, k, v = _qkv(L, D, seed=4)
    got = linear_attention(q, k, v)
    B, H = q.shape[:2]
    ref = torch.empty(B, H, L, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            pq = torch.exp(q[b, h].double()) / torch.exp(q[b, h].double()).sum(-1, keepdim=True)
            pk = torch.exp(k[b, h].double()) / torch.exp(k[b, h].double()).sum(-1, keepdim=True)
            w = pq @ pk.T  # [L, L] kernel weights phi(q_t) . phi(k_s), all keys
            ref[b, h] = (w @ v[b, h].double()) / (1e-5 + w.sum(-1, keepdim=True))
    # fp32 sums of positive terms over <= 331 keys against float64: relative error ~1e-6.
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_linear_attention_epsilon():
    # q and k peaked on different channels: w = phi(q) . phi(k) = (2e^a + D - 2) / (e^a + D - 1)^2 ~ 1e-5,
    # the size of the epsilon, so o_l = v * w / (1e-5 + w) is about v / 2 and shows the epsilon's value.
    D, a = 64, math.log(2e5)
    q = torch.zeros(1, 1, 1, D)
    k = torch.zeros(1, 1, 1, D)
    q[..., 0], k[..., 1] = a, a
    v = torch.ones(1, 1, 1, D)
    ea = math.exp(a)
    w = (2 * ea + D - 2) / (ea + D - 1) ** 2
    expected = w / (1e-5 + w)
    assert 0.4 < expected < 0.6
    # fp32 softmax of tiny features: relative error ~1e-6; an epsilon of 1e-6 would give 0.91, not 0.5.
    torch.testing.assert_close(linear_attention(q, k, v), torch.full_like(v, expected), rtol=1e-5, atol=0)


# --- quantizers -----------------------------------------------------------------------------------

def test_int8_rounds_half_away_from_zero():
    # amax 508 -> scale = 508/127 + 1e-7 = 4 in fp32 (1e-7 is under half an ulp of 4), so x/4 is exact.
    vals = [508.0, -508.0, 2.0, -2.0, 6.0, -6.0, 10.0, -10.0, 1.9, -1.9, 0.0, 3.9]
    x = torch.tensor(vals).reshape(1, 1, 2, 6)
    x8, scale = quantize_per_block_int8(x, block=2)
    assert x8.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (1, 1, 1)
    assert scale.item() == 4.0
    # 0.5 -> 1, 1.5 -> 2, 2.5 -> 3 (half-to-even would give 0, 2, 2).
    assert x8.flatten().tolist() == [127, -127, 1, -1, 2, -2, 3, -3, 0, 0, 0, 1]


@pytest.mark.parametrize("block", [64, 128])
def test_int8_scale_formula_range_and_error(block):
    L, D = 200, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, L, D, generator=g)
    x[0, 0, 7, 3] = 40.0  # an outlier raises its own block's scale only
    x8, scale = quantize_per_block_int8(x, block)
    assert x8.shape == x.shape and scale.shape == (1, 2, math.ceil(L / block))
    for h in range(2):
        for i, (s, e) in enumerate(_spans(L, block)):
            amax = x[0, h, s:e].abs().max()
            assert scale[0, h, i] == amax / 127.0 + 1e-7  # same fp32 ops: exact
            assert x8[0, h, s:e].abs().max() == 127  # the block's amax maps to the top code
    assert x8.abs().max() <= 127
    # Round to nearest: dequantized error at most half a step (plus fp32 slack).
    step = scale.repeat_interleave(block, dim=-1)[..., :L, None]
    assert ((x8.float() * step - x).abs() <= 0.5 * step * (1 + 1e-5)).all()
    # All-zero block: the epsilon keeps the scale finite and the codes zero.
    z8, zs = quantize_per_block_int8(torch.zeros(1, 1, 10, D), block)
    assert (z8 == 0).all() and zs.item() == torch.tensor(1e-7, dtype=torch.float32).item()


def test_int8_smoothing_subtracts_token_mean():
    L, D, block = 200, 64, 64  # last block holds 8 tokens
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, 2, L, D, generator=g) + 8.0 * torch.randn(D, generator=g)
    k8, ks = quantize_per_block_int8(k, block, smooth=True)
    # Equal to quantizing k - mean_L(k): in particular the padding of the partial block stays zero
    # (were it -mean, the last block's scale would grow).
    ref8, refs = quantize_per_block_int8(k - k.mean(dim=-2, keepdim=True), block)
    assert torch.equal(k8, ref8) and torch.equal(ks, refs)
    _, raw_scale = quantize_per_block_int8(k, block)
    assert (ks < raw_scale / 2).all()  # the offset dominated amax; smoothing removed it
    # bf16 input: mean and difference are rounded to bf16, as the upstream Triton kernel does.
    kb = k.bfloat16()
    mean = kb.float().mean(dim=-2, keepdim=True).bfloat16().float()
    smoothed = (kb.float() - mean).bfloat16()
    got = quantize_per_block_int8(kb, block, smooth=True)
    want = quantize_per_block_int8(smoothed, block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_v_fp8_per_channel_hand_values():
    v = torch.zeros(1, 1, 4, 2)
    v[0, 0, :, 0] = torch.tensor([4.5, -1.0, 0.3, 0.0])  # channel 0: amax 4.5 -> scale 2
    vq, scale = quantize_v_per_channel(v, "fp8")  # channel 1: all zero
    assert vq.dtype == torch.float8_e4m3fn and scale.shape == (1, 1, 2)
    assert scale[0, 0].tolist() == [2.0, 0.0]
    # 4.5/2 = 2.25 and -0.5 are exact in e4m3; 0.15 rounds to 0.15625 (1.25 * 2^-3).
    assert vq[0, 0, :, 0].float().tolist() == [2.25, -0.5, 0.15625, 0.0]
    assert (vq[0, 0, :, 1].float() == 0).all()  # no NaN from a zero channel


@pytest.mark.parametrize("L", LENGTHS)
def test_v_quantizers_random(L):
    _, _, v = _qkv(L, 64, seed=7)
    vq, scale = quantize_v_per_channel(v, "fp8")
    amax = v.abs().amax(dim=-2)
    assert torch.equal(scale, amax / 2.25)
    assert torch.equal(vq, (v * (2.25 / amax)[..., None, :]).to(torch.float8_e4m3fn))
    assert vq.float().abs().max() <= 2.25
    # e4m3: 3 mantissa bits, relative rounding error <= 2^-4; subnormal steps are 2^-9 (error 2^-10).
    deq = vq.float() * scale[..., None, :]
    assert ((deq - v).abs() <= 2**-4 * v.abs() + 2**-10 * scale[..., None, :]).all()
    v16, ones = quantize_v_per_channel(v, "fp16")
    assert v16.dtype == torch.float16 and torch.equal(v16, v.half()) and (ones == 1).all()
    with pytest.raises(ValueError, match="v_dtype"):
        quantize_v_per_channel(v, "bf16")


# --- SageSLA --------------------------------------------------------------------------------------

def _fma(a, b, c):
    return (a.double() * b.double() + c.double()).float()


def _sagesla_loop_reference(q, k, v, idx, bq, bk, v_dtype):
    """The documented numerics, one query block and one kept key block at a time, no padding."""
    B, H, L, D = q.shape
    q8, sq = quantize_per_block_int8(q, bq)
    k8, sk = quantize_per_block_int8(k, bk, smooth=True)
    vq, vs = quantize_v_per_channel(v, v_dtype)
    fp8 = v_dtype == "fp8"
    sm = torch.tensor(D**-0.5, dtype=torch.float32) * torch.tensor(1.4426950408889634, dtype=torch.float32)
    offset = torch.tensor(8.807 if fp8 else 0.0)
    out = torch.empty(B, H, L, D)
    for b in range(B):
        for h in range(H):
            for i, (s, e) in enumerate(_spans(L, bq)):
                m = torch.full((e - s,), float("-inf"))
                l = torch.zeros(e - s)
                acc = torch.zeros(e - s, D)
                for j in sorted(idx[b, h, i].tolist()):
                    ks, ke = j * bk, min((j + 1) * bk, L)
                    dot = q8[b, h, s:e].float() @ k8[b, h, ks:ke].float().T
                    scale = sm * (sq[b, h, i] * sk[b, h, j])
                    m_new = torch.maximum(m, (dot * scale).amax(dim=-1))
                    alpha = torch.exp2(m - m_new)
                    p = torch.exp2(_fma(dot, scale, (offset - m_new)[:, None]))
                    if fp8:
                        l = l * alpha + p.sum(-1)
                        pv = p.to(torch.float8_e4m3fn).float() @ vq[b, h, ks:ke].float()
                    else:
                        p16 = p.half().float()
                        l = l * alpha + p16.sum(-1)
                        pv = (p16 @ vq[b, h, ks:ke].float()).half().float()
                    acc = acc * alpha[:, None] + pv
                    m = m_new
                out[b, h, s:e] = acc * (1.0 / l)[:, None] * vs[b, h]
    return out


@pytest.mark.parametrize("v_dtype", ["fp8", "fp16"])
@pytest.mark.parametrize("geometry,L,D", SHAPES, ids=_ids(SHAPES))
def test_sagesla_matches_loop_reference(geometry, L, D, v_dtype):
    bq, bk = geometry
    q, k, v = _qkv(L, D, seed=8)
    idx = block_map(q, k, bq, bk, topk=0.6)
    idx[0, 0, 0] = torch.arange(math.ceil(L / bk) - idx.shape[-1], math.ceil(L / bk))  # partial block kept
    got = sagesla_sparse_attention(q, k, v, idx, bq, bk, v_dtype)
    # Same fp32 operations in the same order; only the summation order inside the P.V products
    # differs (batched vs per-block matmul): ~1 ulp of the O(1) output.
    torch.testing.assert_close(got, _sagesla_loop_reference(q, k, v, idx, bq, bk, v_dtype), rtol=1e-5, atol=1e-6)
    # The kernel order is ascending whatever order block_idx arrives in.
    shuffled = idx.flip(-1)
    assert torch.equal(sagesla_sparse_attention(q, k, v, shuffled, bq, bk, v_dtype), got)


@pytest.mark.parametrize("v_dtype", ["fp8", "fp16"])
@pytest.mark.parametrize("geometry,L,D", SHAPES, ids=_ids(SHAPES))
def test_sagesla_error_bound_against_sla(geometry, L, D, v_dtype):
    """Low-bit o_s against the exact sparse branch on the same blocks.

    Error sources: INT8 Q/K with steps of amax/127 (about 1% of a Gaussian's spread per element,
    ~1.3% on the logits), and for fp8 the e4m3 casts of P and V (3 mantissa bits: relative rounding
    error up to 2^-4 = 6.25%, ~2-3% RMS). Measured here: fp8 rel-L2 0.034-0.039, cosine >= 0.9992;
    fp16 rel-L2 0.011-0.014, cosine >= 0.9999. Bounds sit ~1.6x above that: wrong scales, a
    missing V dequant, a wrong mask or a lost block all give errors of order 1.
    """
    bq, bk = geometry
    q, k, v = _qkv(L, D, seed=9)
    idx = block_map(q, k, bq, bk, topk=0.5)
    ref = sparse_attention(q, k, v, idx, bq, bk)
    got = sagesla_sparse_attention(q, k, v, idx, bq, bk, v_dtype)
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    rel = ((got - ref).norm() / ref.norm()).item()
    min_cos, max_rel = (0.998, 0.06) if v_dtype == "fp8" else (0.9997, 0.022)
    assert cos >= min_cos and rel <= max_rel, f"cos {cos:.6f}, rel {rel:.4f}"


def test_sagesla_input_checks():
    q, k, v = _qkv(200, 96)
    idx = block_map(q, k, 128, 64, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        sagesla_sparse_attention(q, k, v, idx, 128, 64)
    q, k, v = _qkv(200, 64)
    with pytest.raises(ValueError, match="v_dtype"):
        sagesla_sparse_attention(q, k, v, idx, 128, 64, v_dtype="int4")


@pytest.mark.parametrize("mode", ["sla", "sagesla"])
def test_sla_attention_dispatch(mode):
    bq, bk, L, D = 64, 128, 331, 64
    q, k, v = _qkv(L, D, seed=10)
    proj = nn.Linear(D, D)
    cfg = AttentionConfig(mode, block_q=bq, block_k=bk, topk=0.4, v_dtype="fp8")
    idx = block_map(q, k, bq, bk, 0.4)
    o_s = (sparse_attention if mode == "sla" else sagesla_sparse_attention)(q, k, v, idx, bq, bk)
    # All fp32: one addition apart from the explicit composition.
    torch.testing.assert_close(sla_attention(q, k, v, proj, cfg), o_s + proj(linear_attention(q, k, v)),
                               rtol=1e-5, atol=1e-6)


# --- modules --------------------------------------------------------------------------------------

def test_attention_op_state_dict_keys():
    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_op = AttentionOp(128, AttentionConfig("sagesla"))

    sd = SelfAttn().state_dict()
    assert set(sd) == {"attn_op.local_attn.proj_l.weight", "attn_op.local_attn.proj_l.bias"}
    assert sd["attn_op.local_attn.proj_l.weight"].shape == (128, 128)
    assert all(t.dtype == torch.float32 and (t == 0).all() for t in sd.values())  # zero init, fp32
    # Dense mode keeps the keys so every checkpoint loads strictly.
    assert set(AttentionOp(128, AttentionConfig("dense")).state_dict()) == {"local_attn.proj_l.weight",
                                                                            "local_attn.proj_l.bias"}
    with torch.device("meta"):
        op = AttentionOp(128)
    assert op.local_attn.proj_l.weight.is_meta and op.config == AttentionConfig()
    assert isinstance(op.local_attn, SparseLinearAttention)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_attention_op_layout(mode):
    B, L, H, D = 1, 200, 2, 64
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    op = AttentionOp(D, AttentionConfig(mode, block_q=128, block_k=64, topk=0.5))
    with torch.no_grad():
        op.local_attn.proj_l.weight.normal_(0, 0.3)
    out = op(q, k, v)
    assert out.shape == (B, L, H, D)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    expected = t(sla_attention(t(q), t(k), t(v), op.local_attn.proj_l, op.config))
    assert torch.equal(out, expected)
    if mode == "dense":
        # Independent of any transpose: per-head softmax written directly in Wan's layout.
        w = torch.einsum("blhd,bmhd->bhlm", q, k).mul(D**-0.5).softmax(-1)
        torch.testing.assert_close(out, torch.einsum("bhlm,bmhd->blhd", w, v), rtol=1e-5, atol=1e-5)


def test_attention_op_keeps_dtype_and_applies_proj_l_in_fp32():
    B, L, H, D = 1, 200, 2, 128
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(B, L, H, D, generator=g).bfloat16() for _ in range(3))
    op = AttentionOp(D, AttentionConfig("sla", block_q=64, block_k=64, topk=0.5))
    with torch.no_grad():
        op.local_attn.proj_l.weight.normal_(0, 0.3)
    out = op.to(torch.bfloat16)(q, k, v)  # bf16 params too: proj_l is upcast to fp32 inside
    assert out.dtype == torch.bfloat16
    op_ref = AttentionOp(D, op.config)  # fp32 module holding the same (bf16-rounded) weights
    op_ref.load_state_dict({n: t.float() for n, t in op.state_dict().items()})
    ref = op_ref(q.float(), k.float(), v.float())
    # Same fp32 math on the same values; the output is rounded once to bf16 (8-bit mantissa).
    torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-6)
    with pytest.raises(ValueError, match="head_dim"):
        AttentionOp(64)(q, k, v)
