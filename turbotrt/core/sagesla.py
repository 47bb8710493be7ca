"""The SageSLA op contract: the one place that says what the custom op takes, gives and means.

The PyTorch reference (`turbotrt.models.attention`), the ONNX exporter and its function body, the
Triton kernels and the TensorRT plugin all import their constants from here, never from each
other. Nothing here imports torch.

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
Attributes: block_q, block_k, kept_blocks (= n, a count), sm_scale (D^-0.5), quant,
plugin_namespace, plugin_version.

Two words for "how sparse": `AttentionConfig.topk` is the *fraction* of key blocks kept (what
TurboDiffusion's `--topk` means); `kept_blocks` is the *count* n a graph is built with, for one
sequence length. `kept_blocks(num_key_blocks, topk)` is the only conversion.

Supported by the kernels: D in {64, 128}; (block_q, block_k) in {(128, 64), (64, 128)}; pointers
16-byte aligned (TensorRT allocates at 256). Other geometries export and run in ONNX Runtime, but
`turbotrt build` refuses them for the plugin.

quant: "none" is exact softmax attention over the kept blocks (TurboDiffusion's `sla`); "int8_fp8"
and "int8_fp16" are SageSLA (INT8 Q/K per block, P and V in FP8 e4m3 or fp16), whose reference is
`turbotrt.models.attention.sagesla_sparse_attention`. The ONNX function body computes the "none"
math for every mode: ONNX Runtime (and TensorRT for RTX, which inlines it) runs the float
reference, standard TensorRT runs the low-bit plugin, and validation allows the low-bit error.

Upstream sources: SpargeAttn `spas_sage_attn/utils.py` (`get_vanilla_qk_quant`), `csrc/fused/fused.cu`
(V quantization), `csrc/qattn/qk_int_sv_f8_cuda_sm89.cuh` / `_sm90.cuh` / `qk_int_sv_f16_cuda_sm80.cuh`;
TurboDiffusion `turbodiffusion/SLA/utils.py` (the block map's top-k count).
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
HEAD_DIMS = (64, 128)  # the only head dims SpargeAttn's kernels (and ours) are built for
KERNEL_GEOMETRIES = ((128, 64), (64, 128))  # (block_q, block_k) the kernels are built for

# --- the low-bit numerics (shared by the reference emulation and the kernels) -----------------------
V_DTYPES = ("fp8", "fp16")  # P and V: fp8 e4m3 on sm89/sm90/sm120; fp16 on sm80
QUANT_MODES = {"none": None, "int8_fp8": "fp8", "int8_fp16": "fp16"}  # quant attribute -> V dtype
LOG2E = 1.44269504088896340736  # exp(x) = exp2(x * log2(e)); the kernels fold it into the scale
INT8_MAX = 127.0
INT8_SCALE_EPS = 1e-7  # added to amax/127 upstream so an all-zero block has a nonzero scale
# V is scaled to |v| <= 2.25; then a 64-key block's P.V partial is at most 448 * 2.25 * 64 = 64512,
# under the fp16 max (65504) of the build that accumulates P.V in fp16.
V_FP8_RANGE = 2.25
FP8_E4M3_MAX = 448.0
# P is computed as exp2(s - m + 8.807) = 2^8.807 * exp2(s - m): the row max lands near 448 (2^8.807 is
# 447.9, upstream's literal, so the cast never saturates) and small P keep 3 mantissa bits instead
# of falling into e4m3 subnormals.
S_FP8_OFFSET = 8.807


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kept_blocks(num_key_blocks: int, topk: float) -> int:
    """Key blocks kept per query block for a kept *fraction* `topk`: upstream's
    `min(Nk, int(topk * Nk))`, guarded to >= 1.

    Upstream can get 0 on short sequences and then divides 0 by 0 (NaN rows); one block is the
    smallest selection that still defines a softmax.
    """
    if num_key_blocks < 1:
        raise ValueError(f"num_key_blocks must be >= 1, got {num_key_blocks}")
    return max(1, min(num_key_blocks, int(topk * num_key_blocks)))


def quant_mode(attention_mode: str, v_dtype: str) -> str:
    """The op's `quant` attribute for an attention mode (`sla` or `sagesla`) and its V dtype."""
    if attention_mode == "sla":
        return "none"
    if attention_mode != "sagesla":
        raise ValueError(f"the SageSLA op implements attention modes sla and sagesla, not {attention_mode!r}")
    if v_dtype not in V_DTYPES:
        raise ValueError(f"unknown v_dtype {v_dtype!r}; valid: {', '.join(V_DTYPES)}")
    return f"int8_{v_dtype}"


@dataclass(frozen=True)
class SageSLAAttrs:
    block_q: int
    block_k: int
    kept_blocks: int  # n: kept key blocks per query block (the last dim of block_idx)
    sm_scale: float
    quant: str = "none"
    plugin_namespace: str = PLUGIN_NAMESPACE
    plugin_version: str = PLUGIN_VERSION

    def __post_init__(self):
        if self.quant not in QUANT_MODES:
            raise ValueError(f"unknown SageSLA quant mode {self.quant!r}; valid: {', '.join(QUANT_MODES)}")
        if min(self.block_q, self.block_k, self.kept_blocks) < 1:
            raise ValueError(f"block_q, block_k and kept_blocks must be >= 1: {self}")

    def to_onnx(self) -> dict:
        return asdict(self)

    @classmethod
    def from_onnx(cls, attrs: dict) -> "SageSLAAttrs":
        known = {k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs}
        missing = set(cls.__dataclass_fields__) - set(known) - {"quant", "plugin_namespace", "plugin_version"}
        if missing:
            raise ValueError(f"SageSLA node lacks attributes {sorted(missing)}")
        return cls(**known)

    @classmethod
    def for_shape(cls, q_shape, block_q: int, block_k: int, topk: float, quant: str) -> "SageSLAAttrs":
        """The attributes of the op for q `[B, H, L, D]` and a kept fraction `topk`."""
        L, D = q_shape[-2], q_shape[-1]
        return cls(block_q=block_q, block_k=block_k, kept_blocks=kept_blocks(cdiv(L, block_k), topk),
                   sm_scale=D**-0.5, quant=quant)


def check_shapes(q_shape, block_idx_shape, attrs: SageSLAAttrs) -> tuple[int, ...]:
    """Validate input shapes against the contract; returns the output shape."""
    if len(q_shape) != 4:
        raise ValueError(f"SageSLA q must be [B, H, L, D], got {tuple(q_shape)}")
    B, H, L, D = q_shape
    want = (B, H, cdiv(L, attrs.block_q), attrs.kept_blocks)
    if tuple(block_idx_shape) != want:
        raise ValueError(f"SageSLA block_idx must be {want} for q {tuple(q_shape)} and {attrs}, got {tuple(block_idx_shape)}")
    if attrs.kept_blocks > cdiv(L, attrs.block_k):
        raise ValueError(f"kept_blocks {attrs.kept_blocks} exceeds the {cdiv(L, attrs.block_k)} key blocks of L={L}")
    if D not in HEAD_DIMS:  # the kernels (all modes) are built for these head dims only
        raise ValueError(f"SageSLA ({attrs.quant}) supports head_dim {HEAD_DIMS}, got {D}")
    return tuple(q_shape)
