"""W8A8 Linear layers as TurboDiffusion's `-quant` checkpoints store and run them.

Weights and activations share one scheme: 128x128 tiles with one fp32 scale each,
`q = round_half_even(x * (128 / amax))` saturated to int8 and `scale = amax / 128`,
where `amax = max(1e-8, max|tile|)`. The divisor is 128, not 127, so +amax saturates
to 127 while -amax maps to -128.

The GEMM accumulates each 128-wide K tile exactly (int32), dequantizes it with
`scale_a * scale_w` in fp32 and sums the tiles in fp32. The kernel writes its result
in the activation dtype; the bias is added afterwards.

Every nn.Linear inside `blocks` is quantized except SLA's `proj_l` (fp32, head_dim x
head_dim); embeddings, time layers and the head stay float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TILE = 128
QMAX = 128.0  # divisor of the scale; the stored range is still [-128, 127]
AMAX_FLOOR = 1e-8  # keeps all-zero tiles finite; rounded to fp32 like the kernel's constant
SKIP = "proj_l"  # matched as a substring of the module name, as upstream does


def _ntiles(n: int) -> int:
    return -(-n // TILE)


def _pad_to_tiles(x: Tensor) -> Tensor:
    r, c = x.shape
    return F.pad(x, (0, _ntiles(c) * TILE - c, 0, _ntiles(r) * TILE - r))


def _per_row(scale: Tensor, n: int) -> Tensor:
    """[ceil(n/128), T] tile scales -> [n, T]: the scale of each row's tile."""
    return scale.repeat_interleave(TILE, dim=0)[:n]


def quantize_tiles(x: Tensor) -> tuple[Tensor, Tensor]:
    """[R, C] float -> (int8 [R, C], fp32 scale [ceil(R/128), ceil(C/128)])."""
    if x.ndim != 2:
        raise ValueError(f"quantize_tiles wants a 2-D tensor, got shape {tuple(x.shape)}")
    r, c = x.shape
    rt, ct = _ntiles(r), _ntiles(c)
    # Zero padding cannot raise a tile's amax, so edge tiles see only their real values.
    tiles = _pad_to_tiles(x.float()).view(rt, TILE, ct, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
    # Multiply by the fp32 factor 128/amax, as the kernel does, rather than divide each element:
    # the two can round differently near .5.
    factor = (QMAX / amax)[:, None, :, None]
    # torch.round is round-half-to-even, like the kernel's cvt.rni; then saturate.
    q = torch.round(tiles * factor).clamp_(-128, 127).to(torch.int8)
    return q.view(rt * TILE, ct * TILE)[:r, :c].contiguous(), amax / QMAX


def dequantize_tiles(q: Tensor, scale: Tensor) -> Tensor:
    """int8 [R, C] and its tile scales -> fp32 [R, C]."""
    r, c = q.shape
    s = _per_row(scale, r).repeat_interleave(TILE, dim=1)[:, :c]
    return q.float() * s


def int8_tile_matmul(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor) -> Tensor:
    """[R, K] x [N, K]^T with per-tile scales -> fp32 [R, N], one exact product per K tile.

    The int32 accumulation is emulated exactly in fp32: int8 values are exact in fp32 (and
    in tf32, so a tf32 matmul mode stays exact), each product has |.| <= 128*128 = 2^14, and
    a 128-long sum stays within 2^21 < 2^24, so every partial sum is an integer fp32 holds
    exactly, whatever order or blocking the matmul uses.
    """
    r, k = xq.shape
    n = wq.shape[0]
    sa, sw = _per_row(xs, r), _per_row(ws, n)
    out = torch.zeros(r, n, dtype=torch.float32, device=xq.device)
    for t in range(_ntiles(k)):
        cols = slice(t * TILE, min(k, (t + 1) * TILE))
        acc = xq[:, cols].float() @ wq[:, cols].float().T
        # The kernel's order: fp32 scale_a * scale_w, times the tile sum, added to the fp32 total.
        # (Built with fast-math, nvcc may fuse the last two into one FMA: at most 1 ulp per tile.)
        out = out + acc * (sa[:, t, None] * sw[None, :, t])
    return out


class Int8Linear(nn.Module):
    """W8A8 Linear with TurboDiffusion's tensor names: `int8_weight`, `scale`, `bias`.

    All three are buffers, as upstream. Do not cast a model holding these with `.to(dtype)`:
    that would round `scale` (and bias) to the new dtype.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        w_shape, s_shape = (out_features, in_features), (_ntiles(out_features), _ntiles(in_features))
        self.register_buffer("int8_weight", torch.empty(w_shape, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(s_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        # Activation tiles run over the flattened B*L rows: a tile may span two batch entries.
        rows = x.reshape(-1, self.in_features)
        xq, xs = quantize_tiles(rows)
        # The kernel stores its fp32 result in the activation dtype before the bias is added.
        y = int8_tile_matmul(xq, xs, self.int8_weight, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize a Linear's weight; on the meta device only the shapes are made."""
        w, b = linear.weight, linear.bias
        m = cls(linear.in_features, linear.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return m
        with torch.no_grad():
            q, s = quantize_tiles(w)
            m.int8_weight.copy_(q)
            m.scale.copy_(s)
            if b is not None:
                m.bias.copy_(b)
        return m

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def is_quantized_key(name: str) -> bool:
    """Whether the Linear at this qualified name (or one of its tensors) is int8 in `-quant` form.

    Callers check that `name` names a Linear: any inside `blocks` except SLA's proj_l.
    """
    return name.startswith("blocks.") and SKIP not in name


def quantize_linears_(model: nn.Module) -> nn.Module:
    """Swap the quantizable nn.Linear modules for Int8Linear in place (works on meta too)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized_key(n)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Int8Linear.from_linear(getattr(owner, child)))
    return model


def quantize_state_dict(state_dict: dict) -> dict:
    """Float checkpoint -> `-quant` layout: `P.weight` becomes `P.int8_weight` + `P.scale`.

    A quantizable Linear weight is a 2-D `.weight` under `blocks` (norm weights are 1-D).
    Biases and every other tensor pass through unchanged; key order is kept.
    """
    out = {}
    for key, v in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and v.ndim == 2 and is_quantized_key(prefix):
            out[f"{prefix}.int8_weight"], out[f"{prefix}.scale"] = quantize_tiles(v)
        else:
            out[key] = v
    return out
