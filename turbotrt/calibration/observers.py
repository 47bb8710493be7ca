"""Activation observers for the DiT's block Linears, attached as forward pre-hooks.

Every observer watches |x| of one Linear's input over the whole calibration set and gives one
symmetric amax (TensorRT's activations are per tensor, zero point 0):

- max:        the largest |x| seen.
- percentile: the upper edge of the histogram bin where the cumulative count reaches p %.
- entropy:    TensorRT's legacy entropy calibration (GTC 2017, "8-bit Inference with TensorRT"):
              for each candidate of i bins, P = the first i bins with everything beyond folded into
              bin i-1, Q = the same i bins (without the outliers) merged into 128 levels and spread
              back evenly over the bins that were non-empty; pick the i minimising KL(P || Q) and
              return (i + 0.5) bin widths.
- mse:        the bin edge minimising the expected squared error of fake quantization, with the
              histogram's bin centres standing in for the data.

Histograms keep a fixed number of bins; when a later batch exceeds the range, the range doubles
and neighbouring bins merge in pairs, so earlier counts stay exact and nothing is stored per batch.
Candidates stop at the last non-empty bin, and no histogram amax exceeds the largest |x| seen.
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from turbotrt.calibration.config import QuantConfig

AMAX_FLOOR = 1e-8  # an all-zero tensor still needs a positive scale
ENTROPY_LEVELS = 128  # quantized levels of |x|: int8 is symmetric, so half of its 256 codes


# --- which Linears are quantized -------------------------------------------------------------------

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
# Why the Linears outside the quantized set stay float (the same set as TurboDiffusion's W8A8).
FLOAT_REASONS = {
    "patch_embedding": "patch embedding: the network's input layer",
    "text_embedding": "text embedding MLP: outside the blocks",
    "time_embedding": "time embedding: timestep MLP, fp32 as TurboDiffusion runs it",
    "time_projection": "time projection: source of every block's modulation, fp32 as TurboDiffusion runs it",
    "head": "output head: fp32, the network's output layer",
    "proj_l": "SLA proj_l: fp32 head_dim x head_dim, float in TurboDiffusion's W8A8 too",
}


def block_linear_names(num_layers: int) -> list[str]:
    """Every Linear that TurboDiffusion's W8A8 quantizes (the block Linears but SLA's proj_l)."""
    return [f"blocks.{i}.{n}" for i in range(num_layers) for n in BLOCK_LINEARS]


def quantized_linears(num_layers: int, exclude: Iterable[str] = ()) -> list[str]:
    exclude = tuple(exclude)
    return [n for n in block_linear_names(num_layers) if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def skipped_linears(model: nn.Module, quantized: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, str]:
    """name -> why it stays float, for every Linear of the model that is not quantized."""
    quantized = set(quantized)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name in quantized:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            out[name] = "excluded by the config"
            continue
        out[name] = next((why for key, why in FLOAT_REASONS.items() if key in name), "not a block Linear")
    return out


# --- amax from a histogram (pure functions on counts; bin i covers [i*width, (i+1)*width)) ---------

def _trim(hist) -> np.ndarray:
    """Drop the empty bins above the largest value: a doubled range leaves up to half of them empty,
    and no amax beyond the data can be better than the data's own max."""
    hist = np.asarray(hist, dtype=np.float64)
    nz = np.nonzero(hist)[0]
    return hist[: nz[-1] + 1] if nz.size else hist[:0]


def percentile_amax(hist: np.ndarray, width: float, percentile: float) -> float:
    """Upper edge of the first bin where the cumulative share of |x| reaches `percentile` %."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return AMAX_FLOOR
    cdf = np.cumsum(hist) / total
    idx = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12, side="left"))
    return max(AMAX_FLOOR, (min(idx, len(hist) - 1) + 1) * width)


def _expand(counts: np.ndarray, groups: np.ndarray, nonzero: np.ndarray, n_groups: int) -> np.ndarray:
    """Spread each group's count evenly over its non-empty bins (empty bins stay empty)."""
    sums = np.bincount(groups, weights=counts, minlength=n_groups)
    filled = np.bincount(groups, weights=nonzero, minlength=n_groups)
    per_bin = np.divide(sums, filled, out=np.zeros_like(sums), where=filled > 0)
    return per_bin[groups] * nonzero


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of unnormalised counts; infinite where p has mass that q lacks."""
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    if np.any(q[mask] <= 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def entropy_amax(hist: np.ndarray, width: float, levels: int = ENTROPY_LEVELS, start_bin: int | None = None) -> float:
    """TensorRT's legacy KL-divergence threshold over a |x| histogram (see the module docstring).

    Candidates keep i bins, from `start_bin` (at least `levels`) up to the last non-empty bin. The i
    bins merge into `levels` groups of i // levels bins, the last group taking the remainder.
    """
    hist = _trim(hist)
    n = len(hist)
    if n == 0:
        return AMAX_FLOOR
    start = min(n, max(levels, start_bin or levels))
    best_i, best_kl = n, float("inf")
    for i in range(start, n + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        kept = hist[:i]
        size = max(1, i // levels)
        groups = np.minimum(np.arange(i) // size, levels - 1)
        q = _expand(kept, groups, (kept > 0).astype(np.float64), levels)
        kl = _kl(p, q) if q.sum() > 0 else float("inf")
        if kl < best_kl:
            best_i, best_kl = i, kl
    return max(AMAX_FLOOR, (best_i + 0.5) * width)


def int_fake_quant(x: Tensor, amax: float, qmax: float = 127.0) -> Tensor:
    """Symmetric integer fake quantization: round-half-even(x / s) clamped to [-qmax-1, qmax], times s."""
    s = max(float(amax), AMAX_FLOOR) / qmax
    return torch.round(x / s).clamp_(-qmax - 1, qmax) * s


def fp8_fake_quant(x: Tensor, amax: float) -> Tensor:
    """Per-tensor e4m3 fake quantization, saturating at +-448 like ONNX QuantizeLinear (saturate=1)."""
    s = max(float(amax), AMAX_FLOOR) / 448.0
    return (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s


def mse_amax(hist: np.ndarray, width: float, fake_quant: Callable[[Tensor, float], Tensor]) -> float:
    """The bin edge k*width (k >= 1) minimising sum(count * (centre - fake_quant(centre))^2)."""
    hist = _trim(hist)
    if not len(hist):
        return AMAX_FLOOR
    nz = np.nonzero(hist)[0]
    centres = torch.from_numpy((nz + 0.5) * width)
    counts = torch.from_numpy(hist[nz])
    errors = []
    for k in range(1, len(hist) + 1):
        amax = k * width
        err = (centres - fake_quant(centres.float(), amax).double()) ** 2
        errors.append(float((counts * err).sum()))
    return max(AMAX_FLOOR, (int(np.argmin(errors)) + 1) * width)


# --- observers -----------------------------------------------------------------------------------

class MaxObserver:
    def __init__(self):
        self.max = 0.0

    def observe(self, x: Tensor) -> None:
        if x.numel():
            self.max = max(self.max, float(x.detach().abs().max()))

    def amax(self) -> float:
        return max(self.max, AMAX_FLOOR)


class HistogramObserver:
    """|x| histogram with a fixed bin count and a range that doubles as larger values arrive."""

    def __init__(self, num_bins: int):
        self.num_bins = num_bins
        self.range = 0.0
        self.hist = np.zeros(num_bins, dtype=np.float64)
        self.zeros = 0  # values seen while the range was still 0 (all-zero batches so far)
        self.max = 0.0

    @property
    def width(self) -> float:
        return self.range / self.num_bins

    def _grow(self, amax: float) -> None:
        if self.range == 0.0:
            self.range = amax
            self.hist[0] += self.zeros
            return
        while self.range < amax:
            self.hist = self.hist.reshape(-1, 2).sum(axis=1) if self.num_bins % 2 == 0 else self._halve()
            self.hist = np.concatenate([self.hist, np.zeros(self.num_bins - len(self.hist))])
            self.range *= 2.0

    def _halve(self) -> np.ndarray:
        padded = np.concatenate([self.hist, [0.0]])
        return padded.reshape(-1, 2).sum(axis=1)

    def observe(self, x: Tensor) -> None:
        a = x.detach().abs().float().reshape(-1)
        if not a.numel():
            return
        amax = float(a.max())
        self.max = max(self.max, amax)
        if amax == 0.0 and self.range == 0.0:
            self.zeros += a.numel()
            return
        if amax > self.range:
            self._grow(amax)
        counts = torch.histc(a, bins=self.num_bins, min=0.0, max=self.range)
        self.hist += counts.double().cpu().numpy()


class AmaxMethod:
    """An observer plus the rule that turns what it saw into one amax."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.observer = MaxObserver() if config.observer == "max" else HistogramObserver(config.num_bins)

    def observe(self, x: Tensor) -> None:
        self.observer.observe(x)

    def amax(self) -> float:
        c, o = self.config, self.observer
        if c.observer == "max":
            return o.amax()
        if o.range == 0.0:
            return AMAX_FLOOR
        # Bin edges can overshoot the largest value by up to a bin: never exceed what was seen.
        return max(AMAX_FLOOR, min(histogram_amax(o.hist, o.width, c), o.max))


_AMAX_MEMO: dict[tuple, float] = {}


def histogram_amax(hist: np.ndarray, width: float, config: QuantConfig) -> float:
    """amax for a histogram under `config`, memoised: q/k/v of a block see the very same tensor."""
    key = (hashlib.sha1(np.ascontiguousarray(hist).tobytes()).hexdigest(), width, config.observer,
           config.percentile, config.mode)
    if key not in _AMAX_MEMO:
        if config.observer == "percentile":
            value = percentile_amax(hist, width, config.percentile)
        elif config.observer == "entropy":
            value = entropy_amax(hist, width)
        else:
            fq = (lambda v, a: int_fake_quant(v, a, 127.0)) if config.mode == "int8" else fp8_fake_quant
            value = mse_amax(hist, width, fq)
        if len(_AMAX_MEMO) > 4096:
            _AMAX_MEMO.clear()
        _AMAX_MEMO[key] = value
    return _AMAX_MEMO[key]


class ChannelMaxObserver:
    """Per-input-channel max |x| (SmoothQuant's activation statistic)."""

    def __init__(self):
        self.max: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        m = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(dim=0)
        self.max = m if self.max is None else torch.maximum(self.max, m)

    def amax(self) -> Tensor:
        return self.max.clamp_min(AMAX_FLOOR).cpu()


# --- running the model with hooks ------------------------------------------------------------------

def observe_inputs(model: nn.Module, names: Iterable[str], make: Callable[[], object], run: Callable[[], None]) -> dict:
    """Attach `make()` observers to the inputs of the named Linears, call `run()`, detach.

    Forward pre-hooks see exactly the tensor the Linear multiplies, whatever produced it.
    """
    observers = {n: make() for n in names}
    handles = []
    try:
        for name, obs in observers.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, o=obs: o.observe(args[0])))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return observers


def activation_amax(observers: Mapping[str, AmaxMethod]) -> dict[str, float]:
    return {name: float(obs.amax()) for name, obs in observers.items()}
