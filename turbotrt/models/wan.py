"""The Wan2.1 DiT as TurboDiffusion runs it: the PyTorch reference every export is checked against.

Precision follows TurboDiffusion's inference code (`rcm/networks/wan2pt1.py` with its default fast
norms), which differs from original Wan2.1 in two places: the residual stream stays in the weights'
dtype (bf16 for the released checkpoints; Wan2.1 lets it become fp32), and RoPE angles are fp32
(Wan2.1 uses float64). Time embedding, modulation arithmetic, norms and the head run in fp32; norm
outputs, gates and Linear layers are in the weights' dtype. Parameter names equal TurboDiffusion's,
so its checkpoints load with `strict=True`.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from turbotrt.core.configs import AttentionConfig, WanConfig
from turbotrt.models.attention import AttentionOp
from turbotrt.models.dtypes import torch_dtype

ROPE_THETA = 10000.0
ROPE_MAX_GRID = (128, 128, 128)  # TurboDiffusion's tables: 128 positions per axis (t, h, w)


# --- small building blocks ---------------------------------------------------------------------

class WanRMSNorm(nn.Module):
    """RMSNorm over the whole last dim (for q/k: all heads at once, not per head).

    As TurboDiffusion's fast norm: x * rstd * weight in fp32, rounded once to x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, rounded once to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def linear_fp32(layer: nn.Linear, x):
    """A Linear evaluated in fp32 whatever its stored dtype (Wan's fp32 autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """`cat([cos, sin])` of t * 10000^(-i/(dim/2)), computed in float64 as Wan does, returned fp32."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


# --- 3D RoPE ---------------------------------------------------------------------------------------

def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to the t/h/w axes: 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [L, head_dim/2] fp32, for tokens ordered (t h w).

    Pair i of a head (dims 2i, 2i+1) rotates by position * theta^(-2j/d_axis), frequencies laid out
    [t, h, w] as in Wan's complex-number form; angles in fp32 as TurboDiffusion computes them.
    Always built on the CPU (then moved) so a model on `meta` still gets real tables.
    """
    f, h, w = grid
    if any(n > m for n, m in zip(grid, ROPE_MAX_GRID)):
        raise ValueError(f"RoPE covers a patch grid of at most {ROPE_MAX_GRID} (t, h, w); got {grid}")
    angles = []
    for axis, (n, d) in enumerate(zip(grid, rope_split(head_dim))):
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        pos = torch.arange(n, dtype=torch.float32)
        a = torch.outer(pos, inv)  # [n, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(f, h, w, d // 2))
    ang = torch.cat(angles, dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.cos(ang).to(device), torch.sin(ang).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, L, H, D] in fp32; returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    xe, xo = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([xe * c - xo * s, xe * s + xo * c], dim=-1)
    return out.flatten(-2).type_as(x)


# --- attention ---------------------------------------------------------------------------------------

class _Projections(nn.Module):
    """q/k/v/o and the full-dim q/k RMSNorms, shared by both attentions (TurboDiffusion's names)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = WanRMSNorm(cfg.dim, cfg.eps)
        self.norm_k = WanRMSNorm(cfg.dim, cfg.eps)


class SelfAttention(_Projections):
    def __init__(self, cfg: WanConfig, attention: AttentionConfig):
        super().__init__(cfg)
        self.attn_op = AttentionOp(cfg.head_dim, attention)

    def forward(self, x, cos, sin):
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        out = self.attn_op(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # [B, L, H, D]
        return self.o(out.flatten(-2))


class CrossAttention(_Projections):
    """Dense attention from video tokens to all text positions (no mask, never sparse)."""

    def forward(self, x, context):
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads).transpose(1, 2)
        k = self.norm_k(self.k(context)).unflatten(-1, heads).transpose(1, 2)
        v = self.v(context).unflatten(-1, heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).type_as(q)
        return self.o(out.transpose(1, 2).flatten(-2))


# --- block, head, model --------------------------------------------------------------------------------

class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig, attention: AttentionConfig):
        super().__init__()
        self.norm1 = WanLayerNorm(cfg.dim, cfg.eps)
        self.self_attn = SelfAttention(cfg, attention)
        self.norm3 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = WanLayerNorm(cfg.dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e0, context, cos, sin):
        """x: residual [B, L, dim] in the weights' dtype; e0: fp32 [B, 6, dim]."""
        m0, m1, m2, m3, m4, m5 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)  # each [B, 1, dim]
        y = self.self_attn((self.norm1(x).float() * (1 + m1) + m0).type_as(x), cos, sin)
        x = x + y * m2.type_as(x)  # the gate is rounded to the residual's dtype, as upstream
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn((self.norm2(x).float() * (1 + m4) + m3).type_as(x))
        return x + y * m5.type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * cfg.patch_numel)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        m0, m1 = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)
        return linear_fp32(self.head, self.norm(x).float() * (1 + m1) + m0)  # fp32 output


class WanModel(nn.Module):
    """forward(x [B,C,T,H,W], timesteps [B] or [B,1], context [B,text_len,text_dim], y=None) -> [B,16,T,H,W]."""

    def __init__(self, config: WanConfig, attention: AttentionConfig | None = None):
        super().__init__()
        cfg = self.config = config
        self.attention = attention or AttentionConfig()
        self.patch_embedding = nn.Linear(cfg.in_dim * cfg.patch_numel, cfg.dim)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg, self.attention) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    # The pieces are separate functions so exporters can split per-prompt and per-step work.

    def patchify(self, x):
        b, c, t, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent {tuple(x.shape)} is not divisible by the patch size {self.config.patch_size}")
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b f h w (c kt kh kw)
        return x.reshape(b, -1, c * pt * ph * pw), (t // pt, h // ph, w // pw)

    def unpatchify(self, x, grid):
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        b, c = x.shape[0], self.config.out_dim
        x = x.reshape(b, f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b c f kt h kh w kw
        return x.reshape(b, c, f * pt, h * ph, w * pw)

    def embed_time(self, t_freq):
        """Sinusoid [B, freq_dim] -> e [B, dim] (for the head) and e0 [B, 6, dim] (for the blocks), fp32."""
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], t_freq.float())))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def embed_text(self, context):
        return self.text_embedding(context.to(self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def forward(self, x, timesteps, context, y=None):
        t = timesteps.reshape(timesteps.shape[0])
        return self.forward_from_sinusoid(x, sinusoidal_embedding(self.config.freq_dim, t), context, y)

    def forward_from_sinusoid(self, x, t_freq, context, y=None):
        """forward with the timestep already embedded as its float64-computed sinusoid (fp32 [B, freq_dim]).

        Exported graphs start here: the sinusoid needs float64, which TensorRT lacks, and it is 256
        numbers per step that the runtime computes exactly (turbotrt.core.rcm.timestep_sinusoid).
        """
        cfg = self.config
        if cfg.is_i2v:
            if y is None:
                raise ValueError(f"{cfg.name} is an image-to-video model: pass the conditioning y")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif y is not None:
            raise ValueError(f"{cfg.name} is a text-to-video model: y must be None")
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"{cfg.name} expects {cfg.in_dim} input channels, got {x.shape[1]}")
        tokens, grid = self.patchify(x)
        h = self.patch_embedding(tokens.to(self.dtype))
        e, e0 = self.embed_time(t_freq)
        ctx = self.embed_text(context)
        cos, sin = rope_tables(grid, cfg.head_dim, device=h.device)
        for block in self.blocks:
            h = block(h, e0, ctx, cos, sin)
        return self.unpatchify(self.head(h, e), grid)


def random_tensor(name: str, shape, seed: int = 0, proj_l_std: float = 0.02) -> torch.Tensor:
    """The seeded random value of one parameter (fp32), a function of (seed, name) only.

    Per-name generators let a checkpoint of any size be generated one tensor at a time, the same on
    every machine. proj_l is zero in a freshly initialised TurboDiffusion model; here it gets small
    random values so the linear branch of SLA contributes and is tested.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    shape = tuple(shape)
    val = torch.randn(shape, generator=g)
    if name.endswith("modulation"):
        return val / shape[-1] ** 0.5
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * val
    if "proj_l" in name:
        return proj_l_std * val
    if len(shape) == 2:
        return val / math.sqrt(shape[1])
    return 0.02 * val


def init_random_(model: WanModel, seed: int = 0) -> WanModel:
    """Fill a model with `random_tensor` values (for the tiny built-in models and tests)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_tensor(name, p.shape, seed).to(p.dtype))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def random_wan_state_dict(config: WanConfig, seed: int = 0, dtype: str = "bf16", quantized: bool = False) -> dict:
    """A checkpoint-shaped state dict with seeded random weights (TurboDiffusion's key names).

    proj_l is kept in fp32 like TurboDiffusion's; `quantized` gives the W8A8 `-quant` layout.
    """
    return {name: make() for name, _, _, make in random_wan_entries(config, seed, dtype, quantized)}


def random_checkpoint_tensor(name: str, shape, seed: int = 0, dtype: str = "bf16") -> torch.Tensor:
    """One tensor of a random checkpoint: `random_tensor` in the stored dtype (proj_l stays fp32)."""
    t = random_tensor(name, shape, seed)
    return t if "proj_l" in name else t.to(torch_dtype(dtype))


def random_wan_entries(config: WanConfig, seed: int = 0, dtype: str = "bf16", quantized: bool = False) -> list:
    """[(name, dtype, shape, make)] of a random checkpoint, each tensor made on demand.

    For `write_safetensors_streaming`: a 14B checkpoint (28 GB) is written without holding it.
    """
    from turbotrt.models.int8 import TILE, is_quantized_key, quantize_tiles

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(config).state_dict().items()}
    pending = {}  # int8 weight and scale come from one quantization: keep it until both are taken

    def quantized_part(name, shape, part):
        if name not in pending:
            pending[name] = quantize_tiles(random_checkpoint_tensor(name, shape, seed, dtype))
        return pending.pop(name)[part] if part == 1 else pending[name][part]

    entries = []
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        if quantized and leaf == "weight" and len(shape) == 2 and is_quantized_key(prefix):
            tiles = (-(-shape[0] // TILE), -(-shape[1] // TILE))
            entries.append((f"{prefix}.int8_weight", torch.int8, shape, lambda n=name, s=shape: quantized_part(n, s, 0)))
            entries.append((f"{prefix}.scale", torch.float32, tiles, lambda n=name, s=shape: quantized_part(n, s, 1)))
        else:
            dt = torch.float32 if "proj_l" in name else torch_dtype(dtype)
            entries.append((name, dt, shape, lambda n=name, s=shape: random_checkpoint_tensor(n, s, seed, dtype)))
    return entries
