"""Quantization modes and calibration settings: one validated, frozen config per calibration.

The config says *what* is computed (number format, observer, SmoothQuant, calibration data); it
holds nothing about the GPU that will run the engine, so its hash (`config_hash`) identifies a
calibration cache that any TensorRT target may reuse.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from turbotrt.core.errors import TurbotrtError

MODES = ("int8", "fp8")
OBSERVERS = ("max", "percentile", "entropy", "mse")
# The histogram observers' resolution: TensorRT's entropy calibrator used 2048 bins.
DEFAULT_BINS = 2048
SCHEMA_VERSION = 1  # bump when the meaning of a field (or of the amax it produces) changes

# Varied content and motion, so activations cover more than one kind of scene.
DEFAULT_PROMPTS = (
    "a cat walks slowly through a sunlit garden, camera follows at ground level",
    "aerial view of a city at night, bright traffic streams between dark towers",
    "a red bird flies over a river in the rain, close-up, shallow depth of field",
    "waves crash on black rocks at sunset, slow motion, wide shot",
)


class QuantConfigError(TurbotrtError, ValueError):
    """A calibration setting that is out of range or inconsistent with the others."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the DiT's block Linears for TensorRT's explicit (Q/DQ) quantization.

    mode: "int8" (activations per tensor, weights per output channel, symmetric) or "fp8"
        (e4m3, activations and weights per tensor).
    observer: how an activation's amax is chosen from what calibration saw: "max", "percentile",
        "entropy" (KL divergence of the 8-bit histogram, int8 only) or "mse". None picks
        "percentile" for int8 and "max" for fp8 (e4m3's range rarely gains from clipping).
    percentile: the kept fraction of |x| (in %), for the percentile observer.
    smoothquant_alpha: SmoothQuant migration strength in [0, 1]; None leaves it off.
    prompts / embeddings_digest: the text conditioning; prompts go through the T5 reference,
        or, when prompts is empty, a precomputed embeddings file identified by its sha256.
    steps, seeds: rCM steps of the sampled trajectories and the noise seeds (one trajectory each).
    exclude: fnmatch patterns of block Linears to keep in float (e.g. "blocks.0.*").
    num_bins: histogram bins of the percentile/entropy/mse observers.
    """

    mode: str = "int8"
    observer: str | None = None
    percentile: float = 99.99
    smoothquant_alpha: float | None = None
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    embeddings_digest: str | None = None
    steps: int = 4
    seeds: tuple[int, ...] = (0,)
    exclude: tuple[str, ...] = ()
    num_bins: int = DEFAULT_BINS
    schema_version: int = field(default=SCHEMA_VERSION, repr=False)

    def __post_init__(self):
        set_ = object.__setattr__
        if self.mode not in MODES:
            raise QuantConfigError(f"unknown quantization mode {self.mode!r}; available: {', '.join(MODES)}")
        observer = self.observer or ("percentile" if self.mode == "int8" else "max")
        if observer not in OBSERVERS:
            raise QuantConfigError(f"unknown observer {observer!r}; available: {', '.join(OBSERVERS)}")
        if observer == "entropy" and self.mode == "fp8":
            raise QuantConfigError("the entropy observer models a uniform 8-bit integer grid (TensorRT's INT8 "
                                   "entropy calibrator); for fp8 use max, percentile or mse")
        set_(self, "observer", observer)
        if not _is_real(self.percentile) or not 0.0 < self.percentile <= 100.0:
            raise QuantConfigError(f"percentile is the kept share of |x| in percent, 0 < p <= 100; got {self.percentile!r}")
        set_(self, "percentile", float(self.percentile))
        alpha = self.smoothquant_alpha
        if alpha is not None:
            if not _is_real(alpha) or not 0.0 <= alpha <= 1.0:
                raise QuantConfigError(f"smoothquant_alpha must lie in [0, 1] (or be None for off); got {alpha!r}")
            set_(self, "smoothquant_alpha", float(alpha))
        self._check_text()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 4:
            raise QuantConfigError(f"rCM samples in 1 to 4 steps; got steps={self.steps!r}")
        seeds = _as_tuple(self.seeds, "seeds")
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise QuantConfigError(f"seeds must be one or more non-negative ints; got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise QuantConfigError(f"seeds repeat: {seeds} (a repeated seed repeats its trajectory)")
        set_(self, "seeds", seeds)
        exclude = _as_tuple(self.exclude, "exclude")
        if any(not isinstance(p, str) or not p for p in exclude):
            raise QuantConfigError(f"exclude must hold non-empty fnmatch patterns; got {self.exclude!r}")
        set_(self, "exclude", exclude)
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or self.num_bins < 128:
            # Entropy calibration merges bins into 128 quantized levels: fewer bins cannot be merged.
            raise QuantConfigError(f"num_bins must be an int >= 128; got {self.num_bins!r}")

    def _check_text(self):
        prompts = _as_tuple(self.prompts, "prompts")
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise QuantConfigError("prompts must be non-empty strings")
        digest = self.embeddings_digest
        if bool(prompts) == (digest is not None):
            raise QuantConfigError("give either prompts (encoded by the T5 reference) or an embeddings file "
                                   "(embeddings_digest), not both and not neither")
        if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise QuantConfigError(f"embeddings_digest must be a lowercase sha256 hex digest; got {digest!r}")
        object.__setattr__(self, "prompts", prompts)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("prompts", "seeds", "exclude"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise QuantConfigError(f"unknown QuantConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def config_hash(self) -> str:
        """16 hex digits of sha256 over the canonical JSON of every field.

        Stable across processes and machines (no Python `hash()`, sorted keys, floats as repr),
        and GPU-independent by construction: nothing here depends on the engine's target.
        """
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _as_tuple(value, name: str) -> tuple:
    if isinstance(value, str):
        raise QuantConfigError(f"{name} must be a sequence, not a single string ({value!r})")
    try:
        return tuple(value)
    except TypeError:
        raise QuantConfigError(f"{name} must be a sequence; got {value!r}") from None


def file_digest(path) -> str:
    """sha256 of a file's bytes, read in chunks (an embeddings file can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
