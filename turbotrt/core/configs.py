"""Model presets, attention settings and shape profiles: the one source of truth for the CLI,
exporters, manifests and the runtime. Torch-free.

Full-size presets follow the released TurboDiffusion checkpoints; the `wan-tiny*` presets keep the
real head_dim (128), patch size, text length and channel counts so every code path (RoPE split,
SLA blocks, I2V conditioning) is exercised, but run in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from turbotrt.core import sagesla


@dataclass(frozen=True)
class WanConfig:
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16  # 36 for I2V: 16 noisy latent + 4 mask + 16 conditioning latent channels
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    # Sampling defaults that belong to the checkpoint, not to the run.
    sigma_max: float = 80.0
    experts: tuple[str, ...] = ()  # I2V A14B: ("high", "low") noise experts
    boundary: float | None = None  # switch to the low-noise expert at the first step with t < boundary
    resolutions: tuple[str, ...] = ("480p",)
    default_resolution: str = "480p"
    default_frames: int = 81
    text_encoder: str = "umt5-xxl"
    vae: str = "wan2.1-vae"
    # Default SLA geometry (TurboDiffusion's `sla` inference: 128/64, topk 0.1); a run may override.
    sla_block_q: int = 128
    sla_block_k: int = 64
    sla_topk: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.in_dim != self.out_dim

    @property
    def patch_numel(self) -> int:
        kt, kh, kw = self.patch_size
        return kt * kh * kw

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim {self.head_dim} must be even for RoPE")
        if bool(self.experts) != (self.boundary is not None):
            raise ValueError(f"{self.name}: experts and boundary go together")
        if self.default_resolution not in self.resolutions:
            raise ValueError(f"{self.name}: default resolution {self.default_resolution} not in {self.resolutions}")


_FULL = dict(text_encoder="umt5-xxl", vae="wan2.1-vae")
_TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, text_encoder="umt5-tiny",
             vae="wan-vae-tiny", resolutions=("tiny",), default_resolution="tiny", default_frames=17,
             sla_topk=0.5)  # 160 tokens in the real 128/64 geometry: 2 query x 3 key blocks, 1 kept per row

PRESETS: dict[str, WanConfig] = {
    c.name: c
    for c in [
        WanConfig("wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, **_FULL),
        WanConfig("wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                  resolutions=("480p", "720p"), **_FULL),
        WanConfig("wan2.2-i2v-a14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36,
                  sigma_max=200.0, experts=("high", "low"), boundary=0.9,
                  resolutions=("480p", "720p"), default_resolution="720p", **_FULL),
        WanConfig("wan-tiny", **_TINY),
        WanConfig("wan-tiny-i2v", in_dim=36, sigma_max=200.0, experts=("high", "low"), boundary=0.9, **_TINY),
    ]
}


def list_configs() -> list[str]:
    return list(PRESETS)


def get_config(name: str) -> WanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Shape profiles: (width, height) per resolution and aspect ratio, and frame counts of the form 4k+1.

VAE_STRIDE = (4, 8, 8)  # time, height, width compression of the Wan VAE

RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (624, 624)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)},
    "tiny": {"16:9": (128, 64), "9:16": (64, 128), "1:1": (64, 64)},
}
MAX_FRAMES = 125  # 32 latent frames: the time length of TurboDiffusion's RoPE module (len_t=32)


@dataclass(frozen=True)
class ShapeProfile:
    """One static shape a network is exported and built for."""

    resolution: str
    aspect: str
    width: int
    height: int
    frames: int
    batch: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return f"{self.resolution}-{self.aspect.replace(':', 'x')}-{self.frames}f"

    def latent_shape(self, channels: int = 16) -> tuple[int, int, int, int]:
        t, h, w = VAE_STRIDE
        return (channels, 1 + (self.frames - 1) // t, self.height // h, self.width // w)

    def grid(self, patch_size=(1, 2, 2)) -> tuple[int, int, int]:
        _, lt, lh, lw = self.latent_shape()
        pt, ph, pw = patch_size
        return (lt // pt, lh // ph, lw // pw)

    def seq_len(self, patch_size=(1, 2, 2)) -> int:
        f, h, w = self.grid(patch_size)
        return f * h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.update(name=self.name, latent_shape=list(self.latent_shape()), seq_len=self.seq_len())
        return d


def validate_frames(frames: int) -> int:
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % VAE_STRIDE[0] or frames > MAX_FRAMES:
        raise ValueError(
            f"frames must be of the form 4k+1 between 1 and {MAX_FRAMES} (e.g. 17, 49, 81); got {frames}"
        )
    return frames


def shape_profile(resolution: str, frames: int, aspect: str = "16:9", config: WanConfig | None = None) -> ShapeProfile:
    """Validated shape profile; with a config, the resolution must be one that model supports."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; available: {', '.join(RESOLUTIONS)}")
    if config is not None and resolution not in config.resolutions:
        raise ValueError(f"{config.name} supports resolutions {', '.join(config.resolutions)}, not {resolution}")
    aspects = RESOLUTIONS[resolution]
    if aspect not in aspects:
        raise ValueError(f"{resolution} supports aspect ratios {', '.join(aspects)}, not {aspect!r}")
    width, height = aspects[aspect]
    return ShapeProfile(resolution, aspect, width, height, validate_frames(frames))


def default_profile(config: WanConfig) -> ShapeProfile:
    return shape_profile(config.default_resolution, config.default_frames, "16:9", config)


# ---------------------------------------------------------------------------------------------
# Self-attention settings of a DiT (what the reference computes and what an export records).

ATTENTION_MODES = ("dense", "sla", "sagesla")


@dataclass(frozen=True)
class AttentionConfig:
    """dense: softmax attention over all keys. sla: o_s (softmax over the kept key blocks) +
    proj_l(linear attention). sagesla: sla with o_s in SpargeAttn's low-bit numerics.

    topk is the *fraction* of key blocks each query block keeps (0 < topk <= 1); the count a graph
    uses follows from the sequence length (`sagesla.kept_blocks`). Block sizes are explicit, never
    inferred from a GPU; v_dtype (sagesla only) is the P/V type: fp8 (sm89/90/120) or fp16 (sm80).
    """

    mode: str = "sla"
    block_q: int = 128
    block_k: int = 64
    topk: float = 0.1
    v_dtype: str = "fp8"

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {self.mode!r}; valid modes: {', '.join(ATTENTION_MODES)}")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        topk = self.topk
        if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0.0 < topk <= 1.0:
            raise ValueError(f"topk is the fraction of key blocks kept and must satisfy 0 < topk <= 1, got {topk!r}")
        object.__setattr__(self, "topk", float(topk))
        if self.v_dtype not in sagesla.V_DTYPES:
            raise ValueError(f"unknown v_dtype {self.v_dtype!r}; valid: {', '.join(sagesla.V_DTYPES)}")

    @property
    def sparse(self) -> bool:
        return self.mode != "dense"

    @property
    def quant(self) -> str:
        """The SageSLA op's `quant` attribute for this mode (sla: "none")."""
        return sagesla.quant_mode(self.mode, self.v_dtype)

    def replace(self, **changes) -> "AttentionConfig":
        return AttentionConfig(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_model(cls, config: WanConfig, mode: str = "sla", **overrides) -> "AttentionConfig":
        """The model preset's default geometry and topk, with explicit overrides (None = default)."""
        fields = dict(mode=mode, block_q=config.sla_block_q, block_k=config.sla_block_k, topk=config.sla_topk)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)
