"""Weight quantization for TensorRT's Q/DQ formats, TurboDiffusion's tiles converted, and the
PyTorch fake-quant model that computes what the Q/DQ graph computes.

INT8 weights are symmetric per output channel: `scale_c = amax_c / 127`, codes in [-127, 127]
(TensorRT's weight range). FP8 weights are e4m3 per tensor: `scale = amax / 448`.

From a `-quant` checkpoint the starting point is its int8 codes with one scale per 128x128 tile.
TensorRT has no INT8 block-scaled GEMM, so each output row is re-quantized with its own scale:
`W_tile = q * s_tile` (exactly TurboDiffusion's weight), then `q_c = round(W_tile / scale_c)` with
`scale_c = max_row |W_tile| / 127`. The added error is at most `scale_c / 2 = amax_c / 254` per
element (round to nearest on a grid that covers the row), i.e. at most half a step of the coarsest
tile of the row times 128/127; tiles with smaller scales than the row's largest lose up to that much
of their finer resolution. `conversion_error` measures it against that bound.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from turbotrt.calibration.observers import AMAX_FLOOR, fp8_fake_quant, int_fake_quant

INT8_WEIGHT_QMAX = 127.0
FP8_MAX = 448.0


@dataclass
class QuantizedWeight:
    """A Linear weight as the Q/DQ graph stores it: codes [out, in] and scale ([out] or scalar)."""

    codes: Tensor  # torch.int8 or torch.float8_e4m3fn, [out, in]
    scale: Tensor  # fp32: [out] for int8 per channel, [] for fp8 per tensor

    def dequantize(self) -> Tensor:
        s = self.scale[:, None] if self.scale.ndim == 1 else self.scale
        return self.codes.float() * s


def quantize_weight(w: Tensor, mode: str) -> QuantizedWeight:
    w = w.detach().float()
    if mode == "int8":
        scale = w.abs().amax(dim=1).clamp_min(AMAX_FLOOR) / INT8_WEIGHT_QMAX
        codes = torch.round(w / scale[:, None]).clamp_(-INT8_WEIGHT_QMAX, INT8_WEIGHT_QMAX).to(torch.int8)
        return QuantizedWeight(codes, scale)
    if mode == "fp8":
        scale = w.abs().max().clamp_min(AMAX_FLOOR) / FP8_MAX
        codes = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight(codes, scale)
    raise ValueError(f"unknown mode {mode!r}")


@dataclass(frozen=True)
class ConversionError:
    """Tile -> per-channel conversion error of one weight, against TurboDiffusion's W_tile."""

    max_abs: float  # max |W_pc - W_tile|
    bound: float  # max over rows of amax_c / 254 (half a per-channel step)
    rel_fro: float  # ||W_pc - W_tile|| / ||W_tile||
    slack: float = 0.0  # fp32 rounding of codes * scale: 2 ulp of the largest weight

    @property
    def within_bound(self) -> bool:
        return self.max_abs <= self.bound + self.slack


def conversion_error(w_ref: Tensor, q: QuantizedWeight) -> ConversionError:
    diff = q.dequantize() - w_ref
    bound = float(q.scale.max()) / 2 if q.scale.ndim else float(q.scale) / 2
    rel = float(diff.norm() / w_ref.norm().clamp_min(AMAX_FLOOR))
    slack = 2 * torch.finfo(torch.float32).eps * float(w_ref.abs().max())
    return ConversionError(float(diff.abs().max()), bound, rel, slack)


# --- fake quantization -------------------------------------------------------------------------------

def act_scale(amax: float, mode: str) -> float:
    """Activation scale as stored in the graph (fp32)."""
    qmax = 127.0 if mode == "int8" else FP8_MAX
    return float(torch.tensor(max(amax, AMAX_FLOOR) / qmax, dtype=torch.float32))


def fake_quant_activation(x: Tensor, amax: float, mode: str) -> Tensor:
    """QuantizeLinear -> DequantizeLinear of one activation tensor, in fp32, back to x's dtype."""
    if mode == "int8":
        s = act_scale(amax, mode)
        y = torch.round(x.float() / s).clamp_(-128.0, 127.0) * s  # ONNX int8 Q saturates to [-128, 127]
    else:
        y = fp8_fake_quant(x.float(), amax)
    return y.to(x.dtype)


class FakeQuantLinear(nn.Module):
    """A Linear whose input and weight take the Q/DQ round trip the exported graph applies."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None, input_amax: float, mode: str):
        super().__init__()
        self.mode, self.input_amax = mode, float(input_amax)
        self.register_buffer("weight", weight.dequantize())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        xq = fake_quant_activation(x, self.input_amax, self.mode)
        return F.linear(xq.float(), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, input_amax={self.input_amax:.4g}, out={self.weight.shape[0]}, in={self.weight.shape[1]}"


def fake_quant_model(model: nn.Module, weights: dict[str, QuantizedWeight], amax: dict[str, float], mode: str) -> nn.Module:
    """A copy of `model` with each named Linear replaced by its FakeQuantLinear."""
    fq = copy.deepcopy(model)
    for name, qw in weights.items():
        parent, _, child = name.rpartition(".")
        owner = fq.get_submodule(parent)
        linear = getattr(owner, child)
        setattr(owner, child, FakeQuantLinear(qw, linear.bias, amax[name], mode))
    return fq.eval()


__all__ = ["QuantizedWeight", "ConversionError", "quantize_weight", "conversion_error",
           "act_scale", "fake_quant_activation", "FakeQuantLinear", "fake_quant_model", "int_fake_quant"]
