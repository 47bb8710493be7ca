import pytest
import torch
import torch.nn.functional as F

from turbotrt.models.attention import AttentionConfig
from turbotrt.models.checkpoint import build_wan
from turbotrt.core.configs import PRESETS, get_config
from turbotrt.models.wan import WanModel, apply_rope, count_parameters, init_random_, rope_split, rope_tables


def reference_keys(num_layers: int) -> set[str]:
    """TurboDiffusion's key names, written out from TurboDiffusion's released checkpoints (not from our model)."""
    keys = {
        "patch_embedding.weight", "patch_embedding.bias",
        "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
        "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
        "time_projection.1.weight", "time_projection.1.bias",
        "head.head.weight", "head.head.bias", "head.modulation",
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        keys |= {b + "modulation", b + "norm3.weight", b + "norm3.bias"}
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{b}{attn}.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")}
            keys |= {f"{b}{attn}.norm_q.weight", f"{b}{attn}.norm_k.weight"}
        keys |= {b + "self_attn.attn_op.local_attn.proj_l.weight", b + "self_attn.attn_op.local_attn.proj_l.bias"}
        keys |= {f"{b}ffn.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    return keys


def expected_param_count(c) -> int:
    """Parameter count from the layer shapes of Wan2.1's model.py, independent of the module code."""
    d, f, hd = c.dim, c.ffn_dim, c.head_dim
    attn = 4 * (d * d + d) + 2 * d
    block = 2 * attn + (hd * hd + hd) + 2 * d + (d * f + f + f * d + d) + 6 * d
    embed = (c.in_dim * 4 * d + d) + (c.text_dim * d + d + d * d + d) + (c.freq_dim * d + d + d * d + d) + (d * 6 * d + 6 * d)
    head = d * c.out_dim * 4 + c.out_dim * 4 + 2 * d
    return c.num_layers * block + embed + head


@pytest.mark.parametrize("name", list(PRESETS))
def test_state_dict_keys_equal_turbodiffusion(name):
    c = get_config(name)
    model = build_wan(c, device="meta")
    assert set(model.state_dict()) == reference_keys(c.num_layers)


@pytest.mark.parametrize("name,approx", [("wan2.1-t2v-1.3b", 1.3e9), ("wan2.1-t2v-14b", 14e9), ("wan2.2-i2v-a14b", 14e9)])
def test_full_size_presets_build_on_meta(name, approx):
    c = get_config(name)
    model = build_wan(c, device="meta")
    n = count_parameters(model)
    assert n == expected_param_count(c)
    assert 0.9 * approx < n < 1.15 * approx, n
    assert all(p.is_meta for p in model.parameters())


def test_rope_split():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)


def complex_rope(x, grid, theta=10000.0):
    """Wan's complex-number RoPE, written independently: x [B, L, H, D] -> rotated, in float64."""
    f, h, w = grid
    d = x.shape[-1]
    c = d // 2
    tables = []
    for dim_axis in (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)):
        inv = 1.0 / theta ** (torch.arange(0, dim_axis, 2, dtype=torch.float64) / dim_axis)
        tables.append(torch.polar(torch.ones(1024, inv.numel(), dtype=torch.float64),
                                  torch.outer(torch.arange(1024, dtype=torch.float64), inv)))
    ft, fh, fw = tables
    assert ft.shape[1] + fh.shape[1] + fw.shape[1] == c
    freqs = torch.cat([
        ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, c)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], c, 2))
    return torch.view_as_real(xc * freqs).flatten(-2)


@pytest.mark.parametrize("head_dim,grid", [(128, (3, 4, 5)), (64, (2, 3, 7)), (128, (21, 2, 3)), (128, (2, 30, 52))])
def test_rope_matches_complex_form(head_dim, grid):
    L = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, L, 3, head_dim)
    cos, sin = rope_tables(grid, head_dim)
    # fp32 angles (as upstream) against float64: angle error ~ pos * 6e-8, so < 1e-5 at position 52.
    torch.testing.assert_close(apply_rope(x, cos, sin), complex_rope(x, grid).float(), rtol=1e-5, atol=1e-5)
    # A wrong pairing (rotate-half) or a wrong [t, h, w] order must not pass.
    xr = x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
    assert not torch.allclose(apply_rope(xr, cos, sin), complex_rope(x, grid).float(), atol=1e-3)


def test_patch_embedding_equals_conv3d():
    c = get_config("wan-tiny")
    model = init_random_(WanModel(c))
    x = torch.randn(1, c.in_dim, 3, 8, 6)
    tokens, grid = model.patchify(x)
    conv_w = model.patch_embedding.weight.view(c.dim, c.in_dim, 1, 2, 2)
    ref = F.conv3d(x, conv_w, model.patch_embedding.bias, stride=(1, 2, 2)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.patch_embedding(tokens), ref, rtol=1e-5, atol=1e-5)
    assert grid == (3, 4, 3)


def test_unpatchify_order():
    c = get_config("wan-tiny")
    model = WanModel(c)
    f, h, w = 2, 3, 4
    out = torch.randn(1, f * h * w, 4 * c.out_dim)
    video = model.unpatchify(out, (f, h, w))
    assert video.shape == (1, c.out_dim, f, 2 * h, 2 * w)
    # b (t h w) (kt kh kw c) -> b c (t kt) (h kh) (w kw), checked element by element.
    for t_ in range(f):
        for i in range(h):
            for j in range(w):
                tok = out[0, (t_ * h + i) * w + j].view(1, 2, 2, c.out_dim)
                for kh in range(2):
                    for kw in range(2):
                        assert torch.equal(video[0, :, t_, 2 * i + kh, 2 * j + kw], tok[0, kh, kw])


def _tiny_inputs(c, frames=3, h=8, w=8, batch=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    y = torch.randn(batch, c.in_dim - 16, frames, h, w, generator=g) if c.is_i2v else None
    ctx = torch.randn(batch, c.text_len, c.text_dim, generator=g)
    return x, torch.full((batch, 1), 988.0), ctx, y


@pytest.mark.parametrize("name", ["wan-tiny", "wan-tiny-i2v"])
def test_tiny_forward_shapes_and_finite(name):
    c = get_config(name)
    model = init_random_(WanModel(c, AttentionConfig("sla", block_q=64, block_k=64, topk=0.5)))
    x, t, ctx, y = _tiny_inputs(c)
    out = model(x, t, ctx, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3  # not a dead network


def test_modes_agree_when_all_blocks_are_kept():
    """SLA keeping every key block is dense attention plus the linear branch; with proj_l = 0 it is dense."""
    c = get_config("wan-tiny")
    dense = init_random_(WanModel(c, AttentionConfig("dense")), seed=3)
    sla = WanModel(c, AttentionConfig("sla", block_q=64, block_k=64, topk=1.0))
    sla.load_state_dict(dense.state_dict())
    x, t, ctx, _ = _tiny_inputs(c)
    with torch.no_grad():
        for b in sla.blocks:
            b.self_attn.attn_op.local_attn.proj_l.weight.zero_()
            b.self_attn.attn_op.local_attn.proj_l.bias.zero_()
        # Same math, different summation order (block-wise vs SDPA): fp32 rounding only.
        torch.testing.assert_close(sla(x, t, ctx), dense(x, t, ctx), rtol=1e-4, atol=1e-4)
        sla.load_state_dict(dense.state_dict())  # proj_l nonzero again: the linear branch must show
        assert (sla(x, t, ctx) - dense(x, t, ctx)).abs().max() > 1e-3


def test_wrong_inputs_are_refused():
    c = get_config("wan-tiny")
    model = WanModel(c)
    x, t, ctx, _ = _tiny_inputs(c)
    with pytest.raises(ValueError, match="text-to-video"):
        model(x, t, ctx, torch.zeros(1, 20, 3, 8, 8))
    with pytest.raises(ValueError, match="patch size"):
        model(x[..., :7], t, ctx)
    i2v = WanModel(get_config("wan-tiny-i2v"))
    with pytest.raises(ValueError, match="image-to-video"):
        i2v(x, t, ctx)


def test_bf16_weights_keep_fp32_modulation_path():
    c = get_config("wan-tiny")
    model = init_random_(WanModel(c, AttentionConfig("dense")))
    x, t, ctx, _ = _tiny_inputs(c)
    with torch.no_grad():
        ref = model(x, t, ctx)
        out = model.to(torch.bfloat16)(x, t, ctx)
    assert out.dtype == torch.float32
    # bf16 linears (8-bit mantissa) through 2 blocks: a few percent of the output's scale.
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel
