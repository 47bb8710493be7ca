"""SmoothQuant for the Wan DiT: move activation outliers into the weights, folded where that is exact.

A Linear `y = x W^T` equals `(x / s) (W diag(s))^T` for any positive per-input-channel `s`.
SmoothQuant (Xiao et al., 2023) picks `s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha)`, so the
activation quantized per tensor has flatter channels. The division by `s` must be folded into a
static parameter of the op producing x, or it costs an extra op at run time. In Wan:

Folded (each is an exact rewrite of float parameters; only fp32 rounding changes):
- cross_attn.q: x = LayerNorm_affine(h) (norm3): divide norm3.weight and norm3.bias by s.
- cross_attn.k / cross_attn.v: x = the text embedding, which is computed once and feeds every
  block, so one `s` is shared by all blocks' k and v: divide text_embedding.2's rows and bias.
- cross_attn.o: x = softmax(q k^T) v, linear in each channel of v: divide cross_attn.v's rows and
  bias by s.
- self_attn.o: x = o_s + proj_l(o_l). Both branches are linear in each channel of v, but proj_l
  (one head_dim x head_dim Linear shared by every head) mixes the channels of a head, so `s` must
  be the same for channel d of every head; then v's rows and bias are divided by s and
  proj_l becomes diag(1/s) W_l diag(s) with bias b_l / s. SLA's block map uses only q and k, and
  SageSLA's per-channel V scales absorb s, so every attention mode stays exact.

Skipped:
- self_attn.q/k/v and ffn.0: x = LN(h) * (1 + m1) + m0 where m = modulation + e0(t). e0 comes
  from time_projection, one Linear shared by all blocks whose output depends on the timestep; a
  per-block 1/s could only be folded by giving each block its own time projection (or by an extra
  Mul at run time), so these inputs stay unsmoothed.
- ffn.2: x = GELU(...): not positively homogeneous, nothing to fold into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from turbotrt.calibration.observers import AMAX_FLOOR

SKIPPED = {
    "self_attn.q": "input is LN(x)*(1+m1(t))+m0(t); m(t) comes from the time projection shared by all blocks",
    "self_attn.k": "input is LN(x)*(1+m1(t))+m0(t); m(t) comes from the time projection shared by all blocks",
    "self_attn.v": "input is LN(x)*(1+m1(t))+m0(t); m(t) comes from the time projection shared by all blocks",
    "ffn.0": "input is LN(x)*(1+m4(t))+m3(t); m(t) comes from the time projection shared by all blocks",
    "ffn.2": "input is GELU(...): nothing linear to fold 1/s into",
}


@dataclass(frozen=True)
class SmoothSite:
    """One factor `s`: the Linears whose input it divides, and where 1/s is folded."""

    name: str  # the key of s in caches and reports
    consumers: tuple[str, ...]  # Linears whose weight columns are multiplied by s
    kind: str  # "layernorm", "rows" (a Linear's output rows), "v_and_proj_l"
    producer: str  # the module folded into
    head_dim: int | None = None  # v_and_proj_l: s is shared across heads


def smooth_sites(num_layers: int, head_dim: int, quantized: set[str]) -> list[SmoothSite]:
    """Every legal site whose consumers are all quantized (smoothing a float Linear gains nothing)."""
    sites = [SmoothSite("text_embedding", tuple(f"blocks.{i}.cross_attn.{p}" for i in range(num_layers) for p in "kv"),
                        "rows", "text_embedding.2")]
    for i in range(num_layers):
        b = f"blocks.{i}"
        sites += [
            SmoothSite(f"{b}.cross_attn.q", (f"{b}.cross_attn.q",), "layernorm", f"{b}.norm3"),
            SmoothSite(f"{b}.cross_attn.o", (f"{b}.cross_attn.o",), "rows", f"{b}.cross_attn.v"),
            SmoothSite(f"{b}.self_attn.o", (f"{b}.self_attn.o",), "v_and_proj_l", f"{b}.self_attn", head_dim),
        ]
    return [s for s in sites if all(c in quantized for c in s.consumers)]


def skipped_sites(quantized: list[str]) -> dict[str, str]:
    return {n: why for n in quantized for key, why in SKIPPED.items() if n.endswith("." + key)}


def smoothing_factors(site: SmoothSite, act_amax: Tensor, state_dict: Mapping[str, Tensor], alpha: float) -> Tensor:
    """s = amax(x)^alpha / amax(W[:, j])^(1-alpha) over all consumers (head-shared where needed)."""
    w_amax = torch.stack([state_dict[f"{c}.weight"].float().abs().amax(dim=0) for c in site.consumers]).amax(dim=0)
    a, w = act_amax.float().clamp_min(AMAX_FLOOR), w_amax.clamp_min(AMAX_FLOOR)
    if site.head_dim:  # one factor per in-head channel: the max over heads of each statistic
        a = a.view(-1, site.head_dim).amax(dim=0)
        w = w.view(-1, site.head_dim).amax(dim=0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(1e-5, 1e5)


def expand_factors(site: SmoothSite, s: Tensor, width: int) -> Tensor:
    """The factor of every input channel of the consumers ([dim])."""
    return s.repeat(width // s.numel()) if site.head_dim else s


def apply_smoothing(state_dict: Mapping[str, Tensor], sites: list[SmoothSite], factors: Mapping[str, Tensor]) -> dict:
    """A new fp32 state dict with every site's s folded; tensors not involved are shared, not copied."""
    out = dict(state_dict)

    def scale(name: str, f: Tensor, dim: int | None = None) -> None:
        t = out[name].float()
        out[name] = t / f if dim is None else t / (f[:, None] if dim == 0 else f[None, :])

    for site in sites:
        s = factors[site.name].float()
        width = out[f"{site.consumers[0]}.weight"].shape[1]
        full = expand_factors(site, s, width)
        for c in site.consumers:
            out[f"{c}.weight"] = out[f"{c}.weight"].float() * full[None, :]
        p = site.producer
        if site.kind == "layernorm":
            scale(f"{p}.weight", full)
            scale(f"{p}.bias", full)
        elif site.kind == "rows":
            scale(f"{p}.weight", full, dim=0)
            scale(f"{p}.bias", full)
        elif site.kind == "v_and_proj_l":
            scale(f"{p}.v.weight", full, dim=0)
            scale(f"{p}.v.bias", full)
            pl = f"{p}.attn_op.local_attn.proj_l"
            if f"{pl}.weight" in out:  # W_l' = diag(1/s) W_l diag(s), b_l' = b_l / s
                out[f"{pl}.weight"] = out[f"{pl}.weight"].float() * s[None, :] / s[:, None]
                scale(f"{pl}.bias", s)
        else:
            raise ValueError(f"unknown smoothing site kind {site.kind!r}")
    return out
