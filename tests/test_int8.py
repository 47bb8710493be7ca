"""W8A8 tiles, GEMM and `-quant` layout (turbotrt.models.int8)."""

import math

import torch
from torch import nn

from turbotrt.models.int8 import (
    TILE,
    Int8Linear,
    dequantize_tiles,
    int8_tile_matmul,
    is_quantized_key,
    quantize_linears_,
    quantize_state_dict,
    quantize_tiles,
)

F32_EPS = 2.0**-24  # unit roundoff of fp32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- quantize_tiles on hand-made values ---------------------------------------------------------

def test_round_half_even():
    # amax = 64 (from -64) gives the exact factor 128/64 = 2, so x*2 hits exact halves.
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 1.7, -64.0]])
    q, s = quantize_tiles(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (1, 1)
    # half away from zero would give 1, 2, 3, -1, -2, -3
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 3, -128]]
    assert s.item() == 0.5


def test_rounds_x_times_fp32_factor():
    # x = 0.35546875 is exactly 6.5 * 7/128. The kernel multiplies by the fp32 factor 128/7
    # (rounded up), landing just above 6.5 -> 7; dividing x*128 by 7 would give the tie -> 6.
    q, _ = quantize_tiles(torch.tensor([[0.35546875, -7.0]]))
    assert q.tolist() == [[7, -128]]


def test_saturation_and_divisor_128():
    # +amax maps to 128 and saturates to 127; -amax maps to -128; 127.5 rounds to 128 (even) -> 127.
    x = torch.tensor([[128.0, 127.5, 127.4, -127.5, -64.0]])
    q, s = quantize_tiles(x)
    assert q.tolist() == [[127, 127, 127, -128, -64]]
    assert s.item() == 1.0
    # The divisor is 128 (a /127 scheme would give 95 and a scale of 4/127).
    q, s = quantize_tiles(torch.tensor([[3.0, -4.0]]))
    assert q.tolist() == [[96, -128]] and s.item() == 4.0 / 128


def test_partial_edge_tiles_and_zero_tile():
    x = torch.zeros(130, 200)
    x[5, 7], x[100, 3] = 1.0, -0.5       # tile (0, 0): amax 1
    x[0, 199] = -2.0                      # tile (0, 1): 128 x 72, amax 2
    x[129, 127], x[128, 0] = 3.0, 1.5     # tile (1, 0): 2 x 128, amax 3
    # tile (1, 1) (2 x 72) stays all-zero
    q, s = quantize_tiles(x)
    assert q.shape == (130, 200) and s.shape == (2, 2)
    floor = torch.tensor(1e-8, dtype=torch.float32).item()
    assert s.tolist() == [[1 / 128, 2 / 128], [3 / 128, floor / 128]]
    assert (q[5, 7], q[100, 3], q[0, 199], q[129, 127], q[128, 0]) == (127, -64, -128, 127, 64)
    assert torch.count_nonzero(q) == 5  # the all-zero tile stays zero (finite scale, no NaN)


def test_scales_match_a_tile_loop():
    # Independent tile walk: the scale must be exactly max|tile| / 128 for every tile.
    x = torch.randn(300, 200, generator=_gen(1)) * torch.logspace(-2, 2, 200)
    q, s = quantize_tiles(x)
    for i in range(math.ceil(300 / TILE)):
        for j in range(math.ceil(200 / TILE)):
            tile = x[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE]
            assert s[i, j].item() == tile.abs().max().item() / 128
            # fp64 reference rounding: fp32 rounding of x*factor can flip a near-tie by one code
            ref = torch.round(tile.double() * 128 / tile.abs().max().double()).clamp(-128, 127)
            diff = (q[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE].double() - ref).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# --- round trips ---------------------------------------------------------------------------------

def test_dequant_error_at_most_half_a_step():
    w = torch.randn(300, 260, generator=_gen(2)) * torch.logspace(-3, 1, 260)
    q, s = quantize_tiles(w)
    err = (dequantize_tiles(q, s) - w).abs()
    step = dequantize_tiles(torch.ones_like(q), s)
    # Half a step, plus fp32 slack: the factor 128/amax, x*factor and q*scale each round once,
    # moving x/scale by at most 128 * 3 * 2^-24 < 3e-5 steps.
    saturated = w > 127.5 * step  # (127.5, 128] * scale saturates to 127: up to one full step
    assert saturated.any()
    assert (err <= step * (0.5 + 1e-4))[~saturated].all()
    assert (err <= step * (1 + 1e-4))[saturated].all()


def test_requantizing_dequantized_values_is_exact():
    q = torch.randint(-128, 128, (200, 300), dtype=torch.int8, generator=_gen(3))
    q[::TILE, ::TILE] = -128  # each tile's amax then dequantizes to exactly 128 * scale
    s = torch.rand(2, 3, generator=_gen(4)) * 0.1 + 1e-4
    q2, s2 = quantize_tiles(dequantize_tiles(q, s))
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_positive_max_tile_is_not_a_fixed_point():
    # Consequence of the 128 divisor: a tile whose largest magnitude is +127 re-scales by 127/128.
    q = torch.tensor([[127, -3, 64]], dtype=torch.int8)
    s = torch.tensor([[0.5]])
    q2, s2 = quantize_tiles(dequantize_tiles(q, s))
    assert s2.item() == 0.5 * 127 / 128 and q2.tolist() == [[127, -3, 65]]


# --- GEMM ----------------------------------------------------------------------------------------

def test_tile_matmul_is_exact_integer_arithmetic():
    # Unit scales: the result must equal an int64 matmul bit for bit. K=300 keeps the total
    # under 300 * 2^14 < 2^24, so even the fp32 sum over tiles is exact.
    g = _gen(5)
    xq = torch.randint(-128, 128, (150, 300), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (140, 300), dtype=torch.int8, generator=g)
    xq[:, :TILE], wq[:, :TILE] = -128, -128  # worst-case tile sum 2^21
    out = int8_tile_matmul(xq, torch.ones(2, 3), wq, torch.ones(2, 3))
    assert torch.equal(out.long(), xq.long() @ wq.long().T)


def test_tile_matmul_matches_fp64_dequantized_matmul():
    g = _gen(6)
    x = torch.randn(150, 300, generator=g) * torch.logspace(-1, 1, 300)
    w = torch.randn(140, 300, generator=g)
    (xq, xs), (wq, ws) = quantize_tiles(x), quantize_tiles(w)
    out = int8_tile_matmul(xq, xs, wq, ws).double()
    xd = xq.double() * xs.double().repeat_interleave(TILE, 0)[:150].repeat_interleave(TILE, 1)[:, :300]
    wd = wq.double() * ws.double().repeat_interleave(TILE, 0)[:140].repeat_interleave(TILE, 1)[:, :300]
    ref = xd @ wd.T
    # fp32 summation rounding: each of the T=3 tile terms is rounded twice (scale product, product)
    # and added with one rounding, so |err| <= (T + 2) * u * sum of |terms| <= (T + 2) * u * |x||w|.
    bound = (3 + 2) * F32_EPS * (xd.abs() @ wd.abs().T)
    assert ((out - ref).abs() <= bound).all()
    assert (out - ref).abs().max() > 0  # the bound is not vacuous: fp32 rounding is visible


# --- Int8Linear ----------------------------------------------------------------------------------

def _float_linear(i, o, seed):
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=_gen(seed)) / math.sqrt(i))
        lin.bias.copy_(torch.randn(o, generator=_gen(seed + 1)))
    return lin


def test_int8_linear_close_to_float_linear():
    lin = _float_linear(200, 300, 7)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(77, 200, generator=_gen(9))
    y, ref = q(x), lin(x)
    # Gaussian 128x128 tiles have amax ~ 4.5 sigma: step ~ sigma/28, rounding noise ~ 1% rms per
    # operand, ~1.4% relative on the matmul (bias excluded). 3% leaves margin; a wrong tile or
    # scale mapping gives O(1). The lower bound proves the int8 path actually ran.
    rel = ((y - ref).norm() / (ref - lin.bias).norm()).item()
    assert 1e-3 < rel < 0.03
    assert y.dtype == x.dtype and y.shape == (77, 300)


def test_int8_linear_tiles_flattened_rows():
    lin = _float_linear(200, 300, 10)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 77, 200, generator=_gen(12))
    x[0] *= 10  # per-batch tiling would give batch 1 its own, 10x finer scale
    xq, xs = quantize_tiles(x.reshape(154, 200))  # rows 0..127 span both batch entries
    ref = int8_tile_matmul(xq, xs, q.int8_weight, q.scale) + q.bias
    assert torch.equal(q(x), ref.view(2, 77, 300))


def test_int8_linear_bf16_rounds_before_bias():
    lin = _float_linear(256, 136, 13).to(torch.bfloat16)
    q = Int8Linear.from_linear(lin)
    assert q.bias.dtype == torch.bfloat16
    x = torch.randn(3, 40, 256, generator=_gen(15)).to(torch.bfloat16)
    y = q(x)
    xq, xs = quantize_tiles(x.reshape(-1, 256))
    acc = int8_tile_matmul(xq, xs, q.int8_weight, q.scale)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (acc.to(torch.bfloat16) + q.bias).view(3, 40, 136))


def test_int8_linear_without_bias():
    lin = nn.Linear(130, 20, bias=False)
    q = Int8Linear.from_linear(lin)
    assert q.bias is None and set(q.state_dict()) == {"int8_weight", "scale"}
    x = torch.randn(5, 130, generator=_gen(16))
    assert torch.equal(q(x), int8_tile_matmul(*quantize_tiles(x), q.int8_weight, q.scale))


def test_int8_linear_builds_on_meta():
    q = Int8Linear(5120, 13824, device="meta")
    assert q.int8_weight.is_meta and q.int8_weight.shape == (13824, 5120) and q.int8_weight.dtype == torch.int8
    assert q.scale.shape == (108, 40) and q.scale.dtype == torch.float32
    assert q.bias.shape == (13824,) and q.bias.dtype == torch.bfloat16
    with torch.device("meta"):
        q = Int8Linear.from_linear(nn.Linear(200, 300))
    assert q.int8_weight.is_meta and q.scale.shape == (3, 2) and q.bias.dtype == torch.float32


# --- module swap and checkpoint layout -----------------------------------------------------------

class _Attn(nn.Module):
    def __init__(self, dim, head_dim):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim)
        self.attn_op = nn.Module()
        self.attn_op.local_attn = nn.Module()
        self.attn_op.local_attn.proj_l = nn.Linear(head_dim, head_dim)


class _Block(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, dim))
        self.self_attn = _Attn(dim, 16)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))


class _Tiny(nn.Module):
    def __init__(self, dim=136, ffn_dim=264):
        super().__init__()
        self.patch_embedding = nn.Linear(64, dim)
        self.blocks = nn.ModuleList(_Block(dim, ffn_dim) for _ in range(2))
        self.head = nn.Module()
        self.head.head = nn.Linear(dim, 64)


def test_is_quantized_key():
    assert is_quantized_key("blocks.0.self_attn.q")
    assert is_quantized_key("blocks.3.ffn.2.weight")
    assert not is_quantized_key("blocks.0.self_attn.attn_op.local_attn.proj_l")
    assert not is_quantized_key("head.head")
    assert not is_quantized_key("patch_embedding.weight")


def test_state_dict_layout_and_strict_load():
    torch.manual_seed(17)
    model = _Tiny()
    float_sd = model.state_dict()
    qsd = quantize_state_dict(float_sd)

    linears = [f"blocks.{i}.{n}" for i in range(2) for n in ("self_attn.q", "self_attn.k", "self_attn.v",
                                                               "self_attn.o", "ffn.0", "ffn.2")]
    for p in linears:
        w = float_sd[f"{p}.weight"]
        assert f"{p}.weight" not in qsd
        assert qsd[f"{p}.int8_weight"].dtype == torch.int8 and qsd[f"{p}.int8_weight"].shape == w.shape
        assert qsd[f"{p}.scale"].dtype == torch.float32
        assert qsd[f"{p}.scale"].shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
        assert qsd[f"{p}.bias"] is float_sd[f"{p}.bias"]
    untouched = [k for k in float_sd if not any(k.startswith(p + ".") for p in linears)]
    assert "blocks.0.self_attn.attn_op.local_attn.proj_l.weight" in untouched
    assert {"head.head.weight", "patch_embedding.weight", "blocks.0.norm3.weight",
            "blocks.1.self_attn.norm_q.weight", "blocks.0.modulation"} <= set(untouched)
    assert all(qsd[k] is float_sd[k] for k in untouched)
    assert len(qsd) == len(float_sd) + len(linears)

    # The module swap gives the same names, shapes, dtypes and values.
    swapped = quantize_linears_(model)
    assert isinstance(swapped.blocks[1].ffn[2], Int8Linear)
    assert type(swapped.blocks[0].self_attn.attn_op.local_attn.proj_l) is nn.Linear
    assert type(swapped.head.head) is nn.Linear and type(swapped.patch_embedding) is nn.Linear
    msd = swapped.state_dict()
    assert list(msd) == list(qsd)
    assert all(torch.equal(msd[k], qsd[k]) and msd[k].dtype == qsd[k].dtype for k in qsd)

    # A converted checkpoint loads strictly into a model swapped on the meta device.
    with torch.device("meta"):
        meta = quantize_linears_(_Tiny())
    assert meta.blocks[0].self_attn.q.int8_weight.is_meta
    meta.load_state_dict(qsd, strict=True, assign=True)
    x = torch.randn(3, 136, generator=_gen(18))
    assert torch.equal(meta.blocks[1].self_attn.o(x), swapped.blocks[1].self_attn.o(x))
