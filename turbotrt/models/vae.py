"""Wan2.1 causal video VAE (encoder and decoder) with Wan's state-dict layout and explicit caches.

Structure: causal 3D convolutions (time padding only at the front), RMS norms over channels, residual
blocks, one single-head spatial attention block in each middle stage. Stride (4, 8, 8): three spatial
halvings, of which the last two also halve time (`temporal_downsample = (False, True, True)`; the
decoder mirrors it). `Wan2.1_VAE.pth` loads with strict=True.

Time is causal, so a clip can be streamed. Wan groups frames as 1, 4, 4, ...: the first video frame
alone gives latent frame 0 and every further group of 4 frames gives one latent frame, hence 4k+1
frames <-> k+1 latent frames. Decoding runs one latent frame at a time the same way (1 frame, then 4).

Streaming API (these four functions are what an exporter turns into static graphs):
    decode_first(z0)        -> (video [B,3,1,8h,8w], cache)
    decode_step(z_t, cache) -> (video [B,3,4,8h,8w], cache)
    encode_first(x0)        -> (z [B,16,1,H/8,W/8], cache)
    encode_step(x_4, cache) -> (z [B,16,1,H/8,W/8], cache)
A cache is a flat tuple of tensors whose number, order and shapes depend only on the preset, the
batch and the spatial size; `decode_cache_spec` / `encode_cache_spec` list them with names (the
module path of the layer each belongs to) so a runtime without torch can allocate and loop them.

Why `*_first` is a separate function rather than a step with a zero cache and a flag: Wan treats
the clip's first frame differently in the temporal resamplers, and the number of output frames
differs (1 instead of 4), so no single static graph covers both. The first step needs no cache
input (the history before a clip is zeros, as in Wan's front padding); it returns a cache with the
same layout `*_step` takes and returns. What is cached:
- each temporal-kernel-3 causal conv: its last 2 input frames [B, C_in, 2, h, w] (zeros before the
  clip; a 1-frame first step gives [0, frame]);
- each temporal upsampler (decoder): the last 2 input frames of its time conv. Wan's first latent
  frame bypasses that conv (the 'Rep' case: it is neither doubled nor remembered), so after
  `decode_first` this slot is still zeros;
- each temporal downsampler (encoder): its last input frame [B, C, 1, h, w]. The first frame passes
  through unchanged; later frames are convolved in windows (f[2i-2], f[2i-1], f[2i]) with stride 2.

Layout for `wan2.1-vae` (B batch, h x w latent size): the decode cache holds 32 tensors, all with
2 frames: [B,16,2,h,w] (decoder.conv1), 11 x [B,384,2,h,w], then at 2h x 2w one [B,192,...] and
6 x [B,384,...], at 4h x 4w 6 x [B,192,...], at 8h x 8w 7 x [B,96,...]; the two temporal
upsamplers' slots are at indices 11 and 18 (from 0). At 480p that is ~0.95 G elements. The encode
cache for H x W video holds 24 tensors (22 with 2 frames, the two temporal downsamplers' with 1).
`wan-vae-tiny` has 24 and 16.

`decode` / `encode` stream a whole clip through the steps, in the same chunks as Wan. Given a whole
clip, `decode_first` / `encode_first` compute the same thing in one causal pass (memory grows with
the clip; equal up to float summation order, which CPU kernels pick per tensor shape).

Latent normalisation lives inside the model: `decode_*` take normalised latents (what the DiT
produces) and denormalise them first, `encode_*` return the normalised mean, as Wan's
`decode(z, scale)` / `encode(x, scale)` do. Decoded video is nominally in [-1, 1] but is not clamped
here; the pipeline clamps. Activations run in the weight dtype (TurboDiffusion runs the VAE in bf16).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from turbotrt.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    expected_shapes,
    load_into,
    read_state_dict,
)
from turbotrt.models.dtypes import torch_dtype

STRIDE = (4, 8, 8)  # time, height, width

# Per-channel statistics of Wan2.1 VAE latents (from Wan's vae.py); the DiT works on (z - mean) / std.
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    name: str
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder stage; the decoder has one more per stage, as in Wan
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def stride(self) -> tuple[int, int, int]:
        return (2 ** sum(self.temporal_downsample), 2 ** (len(self.dim_mult) - 1), 2 ** (len(self.dim_mult) - 1))

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"{self.name}: need one temporal_downsample flag per resampling stage")
        if self.stride != STRIDE:
            raise ValueError(f"{self.name}: stride {self.stride} differs from the Wan VAE's {STRIDE}")
        if self.z_dim != len(LATENT_MEAN):
            raise ValueError(f"{self.name}: the latent statistics cover {len(LATENT_MEAN)} channels, not {self.z_dim}")


VAE_PRESETS: dict[str, VAEConfig] = {
    c.name: c
    for c in [
        VAEConfig("wan2.1-vae"),
        # Same topology, strides and latent channels (so the DiT and its normalisation fit), toy width.
        VAEConfig("wan-vae-tiny", dim=8, num_res_blocks=1),
    ]
}


def list_vae_configs() -> list[str]:
    return list(VAE_PRESETS)


def get_vae_config(name: str) -> VAEConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VAE preset {name!r}; available: {', '.join(VAE_PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Frame and size rules, latent normalisation


def latent_frames(frames: int) -> int:
    """Latent frames for a clip of `frames` video frames (1 + (frames - 1) // 4)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % STRIDE[0]:
        raise ValueError(
            f"the Wan VAE takes 4k+1 video frames (1, 5, ..., 81: the first frame alone, then groups of "
            f"{STRIDE[0]}); got {frames!r}"
        )
    return 1 + (frames - 1) // STRIDE[0]


def video_frames(latent: int) -> int:
    """Video frames decoded from `latent` latent frames (the first gives 1 frame, each other 4)."""
    if isinstance(latent, bool) or not isinstance(latent, int) or latent < 1:
        raise ValueError(f"need at least one latent frame; got {latent!r}")
    return 1 + STRIDE[0] * (latent - 1)


def check_video_size(height: int, width: int) -> tuple[int, int]:
    """Latent (height, width); ValueError unless both are positive multiples of 8."""
    s = STRIDE[1]
    if height < s or width < s or height % s or width % s:
        raise ValueError(
            f"video height and width must be positive multiples of {s} (the VAE's spatial stride), "
            f"e.g. 480x832; got {height}x{width}"
        )
    return height // s, width // s


def _latent_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    if z.ndim < 2 or z.shape[1] != len(LATENT_MEAN):
        raise ValueError(f"latents need {len(LATENT_MEAN)} channels in dim 1; got shape {tuple(z.shape)}")
    shape = (1, z.shape[1]) + (1,) * (z.ndim - 2)
    # Same arithmetic as Wan: constants in the working dtype and a multiply by the rounded reciprocal
    # of std, so bf16 results match it bit for bit.
    mean = torch.tensor(LATENT_MEAN, dtype=z.dtype, device=z.device).view(shape)
    inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=z.dtype, device=z.device).view(shape)
    return mean, inv_std


def normalize_latents(z: Tensor) -> Tensor:
    """Raw VAE latents [B, 16, ...] -> the DiT's latent space."""
    mean, inv_std = _latent_stats(z)
    return (z - mean) * inv_std


def denormalize_latents(z: Tensor) -> Tensor:
    """The DiT's latent space -> raw VAE latents (inverse of `normalize_latents`)."""
    mean, inv_std = _latent_stats(z)
    return z / inv_std + mean


# ---------------------------------------------------------------------------------------------
# Layers. Blocks take `(x, io)`; `io` carries the flat cache of one call.


class CacheIO:
    """One call's cache: `take` hands out the incoming tensors in order (None on a clip's first call,
    meaning "zeros before the clip"), `give` collects the outgoing ones. Layers call them in forward
    order, which therefore is the layout of the flat tuple."""

    def __init__(self, cache: Sequence[Tensor] | None):
        self.first = cache is None
        self._in = list(cache) if cache is not None else []
        self._pos = 0
        self.out: list[Tensor] = []
        self.names: list[str] = []

    def take(self, name: str, like: Tensor, frames: int) -> Tensor | None:
        """The next incoming tensor, checked against the layer input `like` ([B, C, T, H, W])."""
        if self.first:
            return None
        if self._pos >= len(self._in):
            raise ValueError(f"cache has {len(self._in)} tensors; layer {name} needs more")
        t = self._in[self._pos]
        self._pos += 1
        want = (like.shape[0], like.shape[1], frames, like.shape[3], like.shape[4])
        if tuple(t.shape) != want:
            raise ValueError(f"cache tensor {self._pos - 1} ({name}) has shape {tuple(t.shape)}, expected {want}")
        return t

    def give(self, name: str, t: Tensor) -> None:
        self.names.append(name)
        self.out.append(t)

    def result(self) -> tuple[Tensor, ...]:
        if self._pos != len(self._in):
            raise ValueError(f"cache has {len(self._in)} tensors, the model uses {self._pos}")
        return tuple(self.out)


class CausalConv3d(nn.Conv3d):
    """Conv3d that sees only present and past frames.

    The `kernel_t - 1` frames before the input come from the cache, or are zeros at the start of a
    clip: the same tensor Wan builds by front padding, so results are identical. Spatial zero padding
    is explicit and the conv itself runs unpadded, as in Wan.
    """

    def __init__(self, cin: int, cout: int, kernel, pad: int = 0):
        super().__init__(cin, cout, kernel)
        self.pad = pad
        self.history = self.kernel_size[0] - 1
        self.cache_name = ""  # set by WanVAE to this module's path

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        if self.history:
            b, c, _, h, w = x.shape
            past = io.take(self.cache_name, x, self.history)
            past = x.new_zeros(b, c, self.history, h, w) if past is None else past
            x = torch.cat([past, x], dim=2)
            io.give(self.cache_name, x[:, :, -self.history:].clone())
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        return super().forward(x)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels (dim 1), scale by sqrt(C) and a learned gain."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))  # [C,1,1,1] video, [C,1,1] image

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _frames_to_batch(x: Tensor) -> Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: Tensor, t: int) -> Tensor:
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        # Indices 1, 4, 5 (SiLU, SiLU, dropout) hold no weights; they keep Wan's key numbering.
        self.residual = nn.ModuleList([
            RMSNorm(cin, 3), nn.SiLU(), CausalConv3d(cin, cout, 3, pad=1),
            RMSNorm(cout, 3), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, pad=1),
        ])  # fmt: skip
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), io)
        h = r[6](F.silu(r[3](h)), io)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, io: CacheIO | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(_frames_to_batch(x)))
        # [(b t), 1, (h w), 3c] with q, k, v side by side in the channels, as Wan lays them out.
        q, k, v = y.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = self.proj(y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return _batch_to_frames(y, t) + x


class Resample(nn.Module):
    """2x spatial up/down-sampling per frame, optionally with 2x temporal up/down-sampling."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.cache_name = ""  # set by WanVAE
        if mode in ("upsample2d", "upsample3d"):
            # Index 0 is the parameter-free nearest upsampling (functional in forward).
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1)])
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))  # 2 output frames per input frame
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)])
            if mode == "downsample3d":
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, io)
        t = x.shape[2]
        y = _frames_to_batch(x)
        if self.mode.startswith("up"):
            # Wan uses "nearest-exact"; at an integer factor of 2 it picks the same pixels as "nearest".
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        else:
            y = F.pad(y, (0, 1, 0, 1))  # pad right/bottom only, then a stride-2 3x3 conv halves H and W
        x = _batch_to_frames(self.resample[1](y), t)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, io)
        return x

    def _time_upsample(self, x: Tensor, io: CacheIO) -> Tensor:
        b, c, _, h, w = x.shape
        head = None
        if io.first:  # Wan's 'Rep' case: the clip's first frame stays a single frame, unconvolved
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] == 0:  # a first step of one frame: the time conv has seen nothing yet
            io.give(self.time_conv.cache_name, head.new_zeros(b, c, self.time_conv.history, h, w))
            return head
        t = x.shape[2]
        y = self.time_conv(x, io)  # [b, 2c, t, h, w]: channel half i of frame j becomes frame 2j + i
        y = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def _time_downsample(self, x: Tensor, io: CacheIO) -> Tensor:
        name = f"{self.cache_name}.time_conv"
        past = io.take(name, x, 1)
        io.give(name, x[:, :, -1:].clone())
        if past is not None:
            return self.time_conv(torch.cat([past, x], dim=2))
        # The clip's first frame passes through; the rest pairs up with the frame before each pair.
        return x if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out: int) -> nn.ModuleList:
    return nn.ModuleList([RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out, 3, pad=1)])


def _run_head(head: nn.ModuleList, x: Tensor, io: CacheIO) -> Tensor:
    return head[2](F.silu(head[0](x)), io)


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, pad=1)
        layers = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.temporal_downsample):
                layers.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)  # mean and log-variance

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        x = self.conv1(x, io)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, io)
        return _run_head(self.head, x, io)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, pad=1)
        self.middle = _middle(dims[0])
        layers = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # each upsampler's conv halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(temporal):
                layers.append(Resample(cout, "upsample3d" if temporal[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor, io: CacheIO) -> Tensor:
        x = self.conv1(x, io)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, io)
        return _run_head(self.head, x, io)


# ---------------------------------------------------------------------------------------------
# The model


def _check_video(x: Tensor, first: bool) -> None:
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, T, H, W]; got shape {tuple(x.shape)}")
    check_video_size(x.shape[3], x.shape[4])
    t = x.shape[2]
    if first:
        latent_frames(t)
    elif t < STRIDE[0] or t % STRIDE[0]:
        raise ValueError(f"encode_step takes groups of {STRIDE[0]} frames (4, 8, ...); got {t}")


def _check_latents(z: Tensor, cfg: VAEConfig) -> None:
    if z.ndim != 5 or z.shape[1] != cfg.z_dim or z.shape[2] < 1:
        raise ValueError(f"latents must be [B, {cfg.z_dim}, T>=1, h, w]; got shape {tuple(z.shape)}")


class WanVAE(nn.Module):
    """Wan2.1 VAE. Top-level keys: `encoder.*`, `conv1.*` (encoder output -> mean and log-variance),
    `conv2.*` (latent -> decoder input), `decoder.*`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = nn.Conv3d(2 * z, 2 * z, 1)
        self.conv2 = nn.Conv3d(z, z, 1)
        self.decoder = Decoder3d(config)
        for name, m in self.named_modules():
            if hasattr(m, "cache_name"):
                m.cache_name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    # --- decoding ---------------------------------------------------------------------------

    def _decode(self, z: Tensor, cache: Sequence[Tensor] | None) -> tuple[Tensor, CacheIO]:
        _check_latents(z, self.config)
        io = CacheIO(cache)
        return self.decoder(self.conv2(denormalize_latents(z)), io), io

    def decode_first(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Start a clip: normalised latents [B,16,T,h,w] -> video [B,3,1+4(T-1),8h,8w] and the cache.

        T=1 is the streamed first step; the whole clip gives the whole video in one pass.
        """
        x, io = self._decode(z, None)
        return x, io.result()

    def decode_step(self, z: Tensor, cache: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Continue a clip: latents [B,16,T,h,w] (T=1 when streaming) -> video [B,3,4T,8h,8w], cache."""
        if cache is None:
            raise ValueError("decode_step continues a clip: pass the cache from decode_first or decode_step")
        x, io = self._decode(z, cache)
        return x, io.result()

    def decode(self, z: Tensor) -> Tensor:
        """Whole clip, one latent frame at a time: [B,16,T,h,w] -> [B,3,1+4(T-1),8h,8w]."""
        _check_latents(z, self.config)
        frames, cache = self.decode_first(z[:, :, :1])
        out = [frames]
        for t in range(1, z.shape[2]):
            frames, cache = self.decode_step(z[:, :, t : t + 1], cache)
            out.append(frames)
        return torch.cat(out, dim=2)

    # --- encoding ---------------------------------------------------------------------------

    def _encode(self, x: Tensor, cache: Sequence[Tensor] | None) -> tuple[Tensor, CacheIO]:
        _check_video(x, cache is None)
        io = CacheIO(cache)
        mean = self.conv1(self.encoder(x, io))[:, : self.config.z_dim]  # channels: mean, then log-variance
        return normalize_latents(mean), io

    def encode_first(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Start a clip: video [B,3,4k+1,H,W] in [-1,1] -> normalised latent mean [B,16,k+1,H/8,W/8], cache.

        k=0 (one frame) is the streamed first step; the whole clip gives all latents in one pass.
        """
        z, io = self._encode(x, None)
        return z, io.result()

    def encode_step(self, x: Tensor, cache: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Continue a clip: video [B,3,4k,H,W] -> latents [B,16,k,H/8,W/8] (k=1 when streaming), cache."""
        if cache is None:
            raise ValueError("encode_step continues a clip: pass the cache from encode_first or encode_step")
        z, io = self._encode(x, cache)
        return z, io.result()

    def encode(self, x: Tensor) -> Tensor:
        """Whole clip, streamed as Wan does (1 frame, then groups of 4): [B,3,4k+1,H,W] -> [B,16,k+1,h,w]."""
        _check_video(x, first=True)
        z, cache = self.encode_first(x[:, :, :1])
        out = [z]
        for s in range(1, x.shape[2], STRIDE[0]):
            z, cache = self.encode_step(x[:, :, s : s + STRIDE[0]], cache)
            out.append(z)
        return torch.cat(out, dim=2)


# ---------------------------------------------------------------------------------------------
# Cache layouts, construction, checkpoints


CacheSpec = tuple[tuple[str, tuple[int, ...]], ...]  # ((slot name, shape), ...) in cache order


def _spec(io: CacheIO) -> CacheSpec:
    return tuple((n, tuple(t.shape)) for n, t in zip(io.names, io.out))


def decode_cache_spec(config: VAEConfig | str, latent_h: int, latent_w: int, batch: int = 1) -> CacheSpec:
    """((name, shape), ...) of the decode cache, in order; computed on `meta` (no memory, no compute)."""
    model = build_vae(config, "meta")
    z = torch.empty(batch, model.config.z_dim, 1, latent_h, latent_w, device="meta")
    return _spec(model._decode(z, None)[1])


def encode_cache_spec(config: VAEConfig | str, height: int, width: int, batch: int = 1) -> CacheSpec:
    """((name, shape), ...) of the encode cache for video of `height` x `width` pixels."""
    model = build_vae(config, "meta")
    x = torch.empty(batch, 3, 1, height, width, device="meta")
    return _spec(model._encode(x, None)[1])


def build_vae(config: VAEConfig | str, device: torch.device | str = "meta") -> WanVAE:
    """A VAE with uninitialised-on-meta (or default-initialised) weights; eval, no grad."""
    cfg = get_vae_config(config) if isinstance(config, str) else config
    with torch.device(device):
        model = WanVAE(cfg)
    return model.eval().requires_grad_(False)




def random_vae_state_dict(
    config: VAEConfig | str, seed: int = 0, dtype: torch.dtype | str = torch.float32
) -> dict[str, Tensor]:
    """Seeded random weights in Wan's layout, the same on every machine (for tiny test checkpoints).

    Values depend only on key names and shapes (keys are filled in sorted order from a CPU generator).
    """
    dtype = torch_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(expected_shapes(build_vae(config, "meta")).items()):
        if name.endswith("gamma"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            v = 0.05 * torch.randn(shape, generator=g)
        else:  # conv weights: unit gain through each layer
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            v = torch.randn(shape, generator=g) / fan_in**0.5
        out[name] = v.to(dtype)
    return out


def detect_vae_config(state_dict: dict[str, Tensor]) -> VAEConfig | None:
    """The preset every key and shape of the checkpoint fits, or None."""
    for cfg in VAE_PRESETS.values():
        expected = expected_shapes(build_vae(cfg, "meta"))
        if expected.keys() == state_dict.keys() and all(tuple(state_dict[k].shape) == s for k, s in expected.items()):
            return cfg
    return None


def _closest_config(state_dict: dict[str, Tensor]) -> VAEConfig:
    def fit(cfg):
        expected = expected_shapes(build_vae(cfg, "meta"))
        return sum(1 for k, s in expected.items() if k in state_dict and tuple(state_dict[k].shape) == s)

    return max(VAE_PRESETS.values(), key=fit)


def load_vae(
    path: str | os.PathLike,
    config_name: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> WanVAE:
    """Load `Wan2.1_VAE.pth` (or a .safetensors with the same keys).

    The preset is detected from the shapes unless named; every key is checked (CheckpointError names
    the missing, unexpected and mis-shaped ones). Weights keep the checkpoint dtype unless `dtype`.
    """
    state_dict = read_state_dict(path)
    if "encoder.conv1.weight" not in state_dict and "decoder.conv1.weight" not in state_dict:
        raise CheckpointError(
            f"{path} is not a Wan VAE checkpoint (no encoder.conv1 / decoder.conv1); "
            f"first keys: {', '.join(sorted(state_dict)[:5])}"
        )
    detected = detect_vae_config(state_dict)
    cfg = get_vae_config(config_name) if config_name else (detected or _closest_config(state_dict))
    model = build_vae(cfg, "meta")
    hint = f"the checkpoint fits preset {detected.name!r}" if detected and detected != cfg else ""
    check_state_dict(expected_shapes(model), state_dict, f"VAE preset {cfg.name!r}", hint)
    load_into(model, state_dict)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
