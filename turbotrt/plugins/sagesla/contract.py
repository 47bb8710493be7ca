"""The SageSLA op contract: one place that says what the custom op takes, gives and means.

The ONNX exporter emits nodes from it, the ONNX function body implements it in standard ops, the
Triton kernels compute it and the TensorRT plugin registers it. Nothing here imports torch.

What the op is. Only the block-sparse softmax core of SLA (o_s) is the custom op. The block map
(mean pooling, scores, TopK), the linear branch and proj_l are standard ONNX ops that TensorRT
runs natively, and the global reductions the low-bit path needs (mean of K over tokens, amax of V
per channel) are standard ReduceMean/ReduceMax nodes feeding the op, so the plugin is a single
kernel launch (an AOT plugin launches exactly one kernel, with no scratch memory).

Inputs (all contiguous, row-major):
  0 q         [B, H, L, D]    float16 | bfloat16 | float32
  1 k         [B, H, L, D]    same dtype as q
  2 v         [B, H, L, D]    same dtype as q
  3 block_idx [B, H, Nq, n]   int32, Nq = ceil(L / block_q); the n kept key blocks of each query
                              block, ascending, each in [0, ceil(L / block_k))
  4 k_mean    [B, H, 1, D]    float32, mean of k over the L tokens (K smoothing before INT8)
  5 v_amax    [B, H, 1, D]    float32, max |v| over the L tokens per channel (FP8 V scale)
Output:
  0 o_s       [B, H, L, D]    same dtype as q
Attributes: block_q, block_k, topk (= n), sm_scale (D^-0.5), quant, plugin_namespace, plugin_version.
Supported by the kernels: D in {64, 128}; (block_q, block_k) in {(128, 64), (64, 128)}; pointers
16-byte aligned (TensorRT allocates at 256). Other geometries export and run in ONNX Runtime, but
`turbotrt build` refuses them.

quant: "none" is exact softmax attention over the kept blocks (TurboDiffusion's `sla`); "int8_fp8"
and "int8_fp16" are SageSLA (INT8 Q/K per block, P and V in FP8 e4m3 or fp16), whose reference is
`turbotrt.models.attention.sagesla_sparse_attention`. The ONNX function body computes the "none"
math for every mode: ONNX Runtime runs the float reference, TensorRT runs the low-bit plugin, and
validation allows the low-bit error (see the attention tests for its bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DOMAIN = "turbodiffusion"
OP_TYPE = "SageSLA"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "turbodiffusion"
PLUGIN_VERSION = "1"
PLUGIN_NAME = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"

INPUT_NAMES = ("q", "k", "v", "block_idx", "k_mean", "v_amax")
OUTPUT_NAMES = ("o_s",)
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
QUANT_MODES = {"none": None, "int8_fp8": "fp8", "int8_fp16": "fp16"}  # mode -> v_dtype of the reference
QUANT_HEAD_DIMS = (64, 128)
KERNEL_GEOMETRIES = ((128, 64), (64, 128))  # (block_q, block_k) the kernels are built for


@dataclass(frozen=True)
class SageSLAAttrs:
    block_q: int
    block_k: int
    topk: int  # n: kept key blocks per query block (the last dim of block_idx)
    sm_scale: float
    quant: str = "none"
    plugin_namespace: str = PLUGIN_NAMESPACE
    plugin_version: str = PLUGIN_VERSION

    def __post_init__(self):
        if self.quant not in QUANT_MODES:
            raise ValueError(f"unknown SageSLA quant mode {self.quant!r}; valid: {', '.join(QUANT_MODES)}")
        if min(self.block_q, self.block_k, self.topk) < 1:
            raise ValueError(f"block_q, block_k and topk must be >= 1: {self}")

    def to_onnx(self) -> dict:
        return asdict(self)

    @classmethod
    def from_onnx(cls, attrs: dict) -> "SageSLAAttrs":
        known = {k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs}
        missing = set(cls.__dataclass_fields__) - set(known) - {"quant", "plugin_namespace", "plugin_version"}
        if missing:
            raise ValueError(f"SageSLA node lacks attributes {sorted(missing)}")
        return cls(**known)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_shapes(q_shape, block_idx_shape, attrs: SageSLAAttrs) -> tuple[int, ...]:
    """Validate input shapes against the contract; returns the output shape."""
    if len(q_shape) != 4:
        raise ValueError(f"SageSLA q must be [B, H, L, D], got {tuple(q_shape)}")
    B, H, L, D = q_shape
    want = (B, H, cdiv(L, attrs.block_q), attrs.topk)
    if tuple(block_idx_shape) != want:
        raise ValueError(f"SageSLA block_idx must be {want} for q {tuple(q_shape)} and {attrs}, got {tuple(block_idx_shape)}")
    if attrs.topk > cdiv(L, attrs.block_k):
        raise ValueError(f"topk {attrs.topk} exceeds the {cdiv(L, attrs.block_k)} key blocks of L={L}")
    if D not in QUANT_HEAD_DIMS:  # the kernels (all modes) are built for these head dims only
        raise ValueError(f"SageSLA ({attrs.quant}) supports head_dim {QUANT_HEAD_DIMS}, got {D}")
    return tuple(q_shape)
