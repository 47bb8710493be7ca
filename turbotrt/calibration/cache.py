"""The calibration cache: what calibration measured, reusable on any GPU target.

JSON with the activation amax of every quantized Linear's input (keyed `<linear>.input`), the
SmoothQuant factors when they were used, the observer, the config (and its hash) and the model
preset. Scales are derived from amax at Q/DQ insertion; nothing here depends on the GPU, the
TensorRT version or the engine's precision, so one cache serves every target. A cache is only
reused for the same config: a different hash means different numbers, and loading is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbotrt.calibration.config import QuantConfig
from turbotrt.core.errors import TurbotrtError
from turbotrt.core.files import write_atomic

FORMAT = "turbotrt-calibration-cache"
VERSION = 1
INPUT_SUFFIX = ".input"


class CacheError(TurbotrtError, ValueError):
    """A calibration cache that cannot be read or does not belong to this calibration."""


class StaleCacheError(CacheError):
    """A cache made with another config (or for another model) than the one asked for."""


@dataclass
class CalibrationCache:
    config: QuantConfig
    preset: str
    amax: dict[str, float]  # Linear name -> activation amax of its input
    smoothing: dict[str, list[float]] = field(default_factory=dict)  # SmoothQuant site -> s
    profile: str = ""  # shape profile of the calibration data (informative)

    @property
    def config_hash(self) -> str:
        return self.config.config_hash()

    def to_dict(self) -> dict:
        return dict(
            format=FORMAT, version=VERSION, config_hash=self.config_hash, model_preset=self.preset,
            method=self.config.observer, mode=self.config.mode, profile=self.profile,
            config=self.config.to_dict(),
            tensors={f"{k}{INPUT_SUFFIX}": {"amax": v} for k, v in sorted(self.amax.items())},
            smoothing={k: list(map(float, v)) for k, v in sorted(self.smoothing.items())},
        )

    def smoothing_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in self.smoothing.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file, then rename)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=2))


def load_cache(path: str | os.PathLike, config: QuantConfig | None = None, preset: str | None = None) -> CalibrationCache:
    """Read a cache; with `config` / `preset`, refuse one made for a different config or model."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: not a readable calibration cache ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CacheError(f"{path}: not a turbotrt calibration cache (format {d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("version") != VERSION:
        raise CacheError(f"{path}: cache version {d.get('version')}, this turbotrt reads version {VERSION}")
    try:
        stored = QuantConfig.from_dict(d["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{path}: invalid config in cache ({e})") from None
    if stored.config_hash() != d.get("config_hash"):
        raise CacheError(f"{path}: its config hashes to {stored.config_hash()} but it records {d.get('config_hash')} "
                         "(edited by hand, or written by another schema)")
    if config is not None and config.config_hash() != stored.config_hash():
        diff = sorted(k for k, v in config.to_dict().items() if stored.to_dict().get(k) != v)
        raise StaleCacheError(
            f"{path} was calibrated with config {stored.config_hash()}, but this run asks for config "
            f"{config.config_hash()} (differs in: {', '.join(diff)}). Its scales do not apply: calibrate "
            "again without --cache, or use the settings recorded in the cache.")
    if preset is not None and d.get("model_preset") != preset:
        raise StaleCacheError(f"{path} was calibrated for model {d.get('model_preset')!r}, not {preset!r}")
    amax = {}
    for key, entry in d.get("tensors", {}).items():
        value = entry.get("amax") if isinstance(entry, dict) else None
        if not key.endswith(INPUT_SUFFIX) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CacheError(f"{path}: bad entry {key!r}: {entry!r} (want '<linear>.input': {{'amax': > 0}})")
        amax[key[: -len(INPUT_SUFFIX)]] = float(value)
    return CalibrationCache(stored, d.get("model_preset", ""), amax,
                            {k: [float(x) for x in v] for k, v in d.get("smoothing", {}).items()}, d.get("profile", ""))
