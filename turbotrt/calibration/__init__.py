"""INT8 / FP8 calibration of the exported DiT into explicit Q/DQ graphs for TensorRT.

Attributes load lazily, so importing the package (e.g. for its click command) costs no torch import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QuantConfig": "config", "QuantConfigError": "config", "MODES": "config", "OBSERVERS": "config",
    "calibrate": "api", "CalibrationError": "api",
    "CalibrationCache": "cache", "load_cache": "cache", "CacheError": "cache", "StaleCacheError": "cache",
    "QuantReport": "report",
    "insert_qdq": "qdq",
    "build_calibration_set": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
