"""Per-network export configs (optimum-style): inputs, outputs, static shapes, dtypes, tolerances.

One `ExportSpec` per graph; the exporter, the validator, the bundle manifest and the runtime all
read these, so a shape or a name is written down exactly once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from turbotrt.models.configs import ShapeProfile, WanConfig

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class IOSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name of the graph input/output

    def random(self, rng: np.random.Generator) -> np.ndarray:
        if self.dtype.startswith("int"):
            return rng.integers(0, 2, self.shape).astype(self.dtype)
        return rng.standard_normal(self.shape).astype(self.dtype)


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max|a-b| <= atol + rtol * max|b| and cosine(a, b) >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float
    why: str = ""


@dataclass(frozen=True)
class ExportSpec:
    network: str  # file stem in the bundle: dit, dit_high, dit_low, text_encoder, vae_decode_first, ...
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    precision: str
    tolerance: Tolerance
    extra: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = [asdict(i) for i in self.inputs]
        d["outputs"] = [asdict(o) for o in self.outputs]
        return d


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)} "
                         "(int8/fp8 come from calibration)")
    return precision


# ONNX Runtime runs the same ops as the PyTorch reference; differences are summation order (fp32)
# or the low-precision rounding of intermediate tensors in a different order (fp16/bf16).
DIT_TOLERANCE = {
    "fp32": Tolerance(1e-4, 1e-3, 0.99999, "same fp32 math, different kernels and summation order"),
    "fp16": Tolerance(5e-2, 5e-2, 0.999, "fp16 rounding of linears/attention in a different order"),
    "bf16": Tolerance(1e-1, 1e-1, 0.995, "bf16 (8-bit mantissa) rounding in a different order"),
}


def dit_spec(config: WanConfig, profile: ShapeProfile, precision: str, network: str = "dit") -> ExportSpec:
    """The DiT step: (x, t_freq, context[, y]) -> velocity. All graph I/O is fp32; weights and
    activations inside are `precision`, with norms, modulation and the head in fp32."""
    check_precision(precision)
    b = profile.batch
    latent = (b, *profile.latent_shape(config.out_dim))
    inputs = [
        IOSpec("x", latent, "float32"),
        IOSpec("t_freq", (b, config.freq_dim), "float32"),
        IOSpec("context", (b, config.text_len, config.text_dim), "float32"),
    ]
    if config.is_i2v:
        inputs.append(IOSpec("y", (b, config.in_dim - config.out_dim, *latent[2:]), "float32"))
    return ExportSpec(network, tuple(inputs), (IOSpec("velocity", latent, "float32"),), precision,
                      DIT_TOLERANCE[precision], extra=dict(seq_len=profile.seq_len(config.patch_size)))
