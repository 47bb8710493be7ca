"""The user cache folder: what turbotrt keeps between processes so that work done once is not redone
(verified bundles' stamps, ONNX Runtime's optimized graphs, TensorRT for RTX runtime caches). Torch-free.

`$TURBOTRT_CACHE`, else `$XDG_CACHE_HOME/turbotrt`, else `~/.cache/turbotrt`. Never inside a bundle
(a bundle is an input: it may be read-only, shared or checked by hash). Everything here can be deleted
at any time; a cache that cannot be read or written costs speed, never correctness.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

_warned: set[str] = set()
_lock = threading.Lock()


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a sub-folder of it); not created here."""
    base = os.environ.get("TURBOTRT_CACHE")
    if base:
        root = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "turbotrt"
    return root.joinpath(*parts)


def warn_once(kind: str, message: str) -> None:
    """One line on stderr per kind of cache trouble per process: a slow start deserves a word, not a flood."""
    with _lock:
        if kind in _warned:
            return
        _warned.add(kind)
    print(f"turbotrt: {message}", file=sys.stderr)
