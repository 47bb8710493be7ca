"""umT5 encoder as Wan2.1 / TurboDiffusion run it, with Wan's own state-dict layout.

Structure (per block, pre-norm): `x += attn(rms(x), bias)`, `x += ffn(rms(x))`, final `rms`.
- Every block owns its relative-position table (`shared_pos=False` in umT5, unlike T5 v1.0).
- Attention has no 1/sqrt(head_dim) scaling: T5 folds it into the initialisation of `q`.
- The FFN is gated: `fc2(fc1(x) * gelu_tanh(gate(x)))`.
- Outputs past each prompt's length are zero: Wan trims to the prompt length and TurboDiffusion
  zero-pads back to `text_len`; `where(mask, x, 0)` is the same for the prefix masks a tokenizer makes.

Precision (the released checkpoint is bf16 and is kept as stored): embeddings, projections, the
residual stream and attention probabilities run in the weight dtype; RMS statistics and softmax run
in fp32. T5 activations overflow fp16 (the residual stream grows past 65504), so run bf16 or fp32.
Upstream's only guard is to clamp the residual stream to +-(fp16 max - 1000) after each add when an
inf shows up in fp16; `fp16_clamp` mirrors it (a no-op for bf16/fp32). It is a patch, not a fix.

Keys (N = 0..num_layers-1): `token_embedding.weight`, `blocks.N.norm1.weight`,
`blocks.N.attn.{q,k,v,o}.weight`, `blocks.N.norm2.weight`, `blocks.N.ffn.gate.0.weight`,
`blocks.N.ffn.fc1.weight`, `blocks.N.ffn.fc2.weight`, `blocks.N.pos_embedding.embedding.weight`,
`norm.weight`. No biases anywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import Tensor

from turbotrt.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    expected_shapes,
    load_into,
    read_state_dict,
)


@dataclass(frozen=True)
class T5Config:
    name: str
    vocab_size: int
    dim: int
    dim_attn: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"{self.name}: dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 2:
            raise ValueError(f"{self.name}: bidirectional buckets need an even num_buckets, got {self.num_buckets}")


T5_PRESETS: dict[str, T5Config] = {
    c.name: c
    for c in [
        T5Config("umt5-xxl", vocab_size=256384, dim=4096, dim_attn=4096, ffn_dim=10240, num_heads=64, num_layers=24),
        # Same code paths at toy size; dim matches the `wan-tiny` DiT's text_dim.
        T5Config("umt5-tiny", vocab_size=1024, dim=64, dim_attn=64, ffn_dim=128, num_heads=4, num_layers=2),
    ]
}


def get_t5_config(name: str) -> T5Config:
    try:
        return T5_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown text encoder preset {name!r}; available: {', '.join(T5_PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Pure functions


def relative_position_bucket(rel_pos: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Bidirectional T5 bucket of `key - query`: half the buckets for keys after the query.

    In each half, distances below `n // 2` get their own bucket; larger ones share log-spaced
    buckets up to `max_distance`, and everything beyond lands in the last one. With 32 buckets the
    boundaries are 0..7 exact, then 8, 12, 16, 23, 32, 46, 64, 91 (+16 when the key is after the query).
    """
    n = num_buckets // 2
    offset = (rel_pos > 0).long() * n
    dist = rel_pos.abs()
    max_exact = n // 2
    # Same fp32 ops as upstream; the clamp only keeps log(0) (-inf -> int cast) out of the graph,
    # for distances that take the exact branch anyway. It clamps the float, not the int64 distance:
    # an integer Clip with only a lower bound on a constant is what TensorRT for RTX's compiler
    # cannot fold ("Cannot convert scalar operand of type 11 to float"); the values are identical.
    ratio = dist.float().clamp(min=max_exact) / max_exact
    large = max_exact + (torch.log(ratio) / math.log(max_distance / max_exact) * (n - max_exact)).long()
    large = large.clamp(max=n - 1)
    return offset + torch.where(dist < max_exact, dist, large)


def relative_positions(lq: int, lk: int, device=None) -> Tensor:
    """`[lq, lk]` int64 table of `key_index - query_index`."""
    return torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # T5 norm: no mean subtraction, no bias; statistics in fp32, then back to a half weight dtype.
    y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return weight * y


def gelu_tanh(x: Tensor) -> Tensor:
    # Written out as upstream does (not F.gelu) so bf16 rounds at the same steps.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def fp16_clamp(x: Tensor) -> Tensor:
    """Upstream's fp16 overflow guard: clamp to +-(max - 1000) when any inf appeared; else identity."""
    if x.dtype != torch.float16:
        return x
    bound = torch.finfo(torch.float16).max - 1000
    # torch.where instead of a Python `if` keeps the data-dependent choice traceable.
    return torch.where(torch.isinf(x).any(), x.clamp(-bound, bound), x)


def key_padding_bias(pos_bias: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """`[B, H, L, L]` attention bias: per-layer position bias, dtype-min on padded keys."""
    pos_bias = pos_bias.to(dtype)
    padded = (mask == 0)[:, None, None, :]
    return torch.where(padded, torch.finfo(dtype).min, pos_bias)


# ---------------------------------------------------------------------------------------------
# Modules (attribute names are the checkpoint's key names)


class T5RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        logits = q @ k.transpose(-1, -2) + bias  # no 1/sqrt(d): T5 convention
        attn = logits.float().softmax(dim=-1).to(logits.dtype)
        return self.o((attn @ v).transpose(1, 2).reshape(b, l, -1))


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        # Sequential so the key is `gate.0.weight`, as in Wan's checkpoint.
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim, bias=False))
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


class T5RelativeEmbedding(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        return self.embedding(buckets).permute(2, 0, 1)[None]  # [1, H, Lq, Lk]


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg)
        self.pos_embedding = T5RelativeEmbedding(cfg)

    def forward(self, x: Tensor, buckets: Tensor, mask: Tensor) -> Tensor:
        bias = key_padding_bias(self.pos_embedding(buckets), mask, x.dtype)
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """`forward(ids [B, L] int64, mask [B, L]) -> [B, L, dim]`, zero past each prompt's length.

    `mask` is nonzero on prompt tokens (a prefix, as the tokenizer makes it); padded keys are masked
    out of attention, so prompt positions do not depend on how much padding follows.
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.token_embedding(ids)
        lq = ids.shape[1]
        buckets = relative_position_bucket(
            relative_positions(lq, lq, ids.device), self.cfg.num_buckets, self.cfg.max_distance
        )
        for block in self.blocks:
            x = block(x, buckets, mask)
        x = self.norm(x)
        return torch.where(mask[..., None] != 0, x, 0)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def build_t5(config: T5Config | str, device: torch.device | str = "meta") -> T5Encoder:
    """Encoder with uninitialised-on-meta (or default-initialised) weights; eval, no grad."""
    cfg = get_t5_config(config) if isinstance(config, str) else config
    with torch.device(device):
        model = T5Encoder(cfg)
    return model.eval().requires_grad_(False)


def detect_t5_config(state_dict: dict[str, Tensor]) -> T5Config:
    """The preset whose shapes the checkpoint has; CheckpointError when none fits."""
    if "token_embedding.weight" not in state_dict:
        layout = "Hugging Face" if any(k.startswith(("shared.", "encoder.block.")) for k in state_dict) else "unknown"
        raise CheckpointError(
            f"not a Wan umT5 encoder checkpoint: no 'token_embedding.weight' ({layout} key layout, "
            f"first keys: {', '.join(sorted(state_dict)[:5])})"
        )
    vocab, dim = state_dict["token_embedding.weight"].shape
    layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    for cfg in T5_PRESETS.values():
        if (cfg.vocab_size, cfg.dim, cfg.num_layers) == (vocab, dim, layers):
            return cfg
    raise CheckpointError(
        f"no umT5 preset has vocab {vocab}, dim {dim}, {layers} layers; presets: "
        + ", ".join(f"{c.name} ({c.vocab_size}, {c.dim}, {c.num_layers})" for c in T5_PRESETS.values())
    )


def load_t5(path: str | os.PathLike, config_name: str | None = None, device: torch.device | str = "cpu") -> T5Encoder:
    """Load Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or a .safetensors with the same keys).

    The preset is detected from shapes unless named; every key is checked (CheckpointError names the
    missing, unexpected and mis-shaped ones); weights keep the checkpoint dtype.
    """
    state_dict = read_state_dict(path)
    cfg = get_t5_config(config_name) if config_name else detect_t5_config(state_dict)
    model = build_t5(cfg, "meta")
    check_state_dict(expected_shapes(model), state_dict, f"umT5 encoder {cfg.name!r}")
    load_into(model, state_dict)
    return model.to(device).eval().requires_grad_(False)


def random_t5_state_dict(config: T5Config | str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Seeded random weights in Wan's layout, the same on every machine (tiny test checkpoints).

    Scaled like T5's initialisation: q carries the 1/sqrt(head_dim) that T5 attention leaves out,
    so random logits stay O(1) and the encoder's outputs are well conditioned.
    """
    cfg = get_t5_config(config) if isinstance(config, str) else config
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(expected_shapes(build_t5(cfg, "meta")).items()):
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "token_embedding.weight":
            v = torch.randn(shape, generator=g)
        elif "pos_embedding" in name:
            v = 0.1 * torch.randn(shape, generator=g)
        else:
            v = torch.randn(shape, generator=g) / shape[1] ** 0.5
            if name.endswith("attn.q.weight"):
                v = v / cfg.head_dim**0.5
        out[name] = v.to(dtype)
    return out
