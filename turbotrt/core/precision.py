"""One precision vocabulary, from the command line to the manifest. Torch-free.

A bundle's `precision` is one of PRECISIONS:
    fp32, fp16, bf16   every graph in that float type (norms, modulation and the head stay fp32;
                       the text encoder stays fp32 in an fp16 bundle: umT5 overflows fp16)
    int8, fp8          the DiT's block Linears quantized with explicit Q/DQ by calibration, over a
                       float graph of `float_precision` (fp32 unless asked otherwise)

Graph I/O and numpy arrays use numpy's dtype names (`float32`, `bfloat16` as ml_dtypes spells it).
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
QUANT_MODES = ("int8", "fp8")
PRECISIONS = FLOAT_PRECISIONS + QUANT_MODES

# precision name -> numpy dtype name (bfloat16 needs ml_dtypes to exist as a numpy dtype)
NUMPY_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Every dtype name a graph input or output may carry.
IO_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool")


@dataclass(frozen=True)
class Precision:
    """A validated precision: the float type of the graphs, and the quantization mode if any."""

    name: str
    float_precision: str = "fp32"

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}; available: {', '.join(PRECISIONS)}")
        if self.name in FLOAT_PRECISIONS:
            object.__setattr__(self, "float_precision", self.name)
        elif self.float_precision not in FLOAT_PRECISIONS:
            raise ValueError(f"the float part of a {self.name} bundle is one of {', '.join(FLOAT_PRECISIONS)}, "
                             f"not {self.float_precision!r}")

    @property
    def quant(self) -> str | None:
        """"int8" or "fp8" for a quantized precision, else None."""
        return self.name if self.name in QUANT_MODES else None

    @property
    def numpy_dtype(self) -> str:
        return NUMPY_DTYPE[self.float_precision]


def text_encoder_precision(precision: str) -> str:
    """umT5 activations overflow fp16: an fp16 bundle keeps its text encoder in fp32."""
    p = Precision(precision)
    return "fp32" if p.float_precision == "fp16" else p.float_precision
