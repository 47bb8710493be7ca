"""Checkpoint reading and checking, shared by every network (DiT, umT5, VAE).

Checkpoints are untrusted input: `.pth` files are read with `weights_only=True` (no pickle code
runs) and memory-mapped so a 28 GB file costs address space, not RAM; `.safetensors` files are
memory-mapped by design. Tensors keep their stored dtype (bf16 for the released models).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from turbotrt.core.errors import TurbotrtError

SUFFIXES = (".pth", ".pt", ".safetensors")


class CheckpointError(TurbotrtError, ValueError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (weights only, mmap) or `.safetensors` file into a flat state dict."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (.pth or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd = read_safetensors(path)
    elif suffix in (".pth", ".pt"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for truncated/zip/pickle errors
            raise CheckpointError(
                f"{path} could not be read as a weights-only PyTorch checkpoint "
                f"(truncated, corrupt, or it needs pickled code, which is refused): {e}"
            ) from e
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    return _flatten(sd, path)


_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file as zero-copy views of a read-only shared mapping.

    A read-only shared mapping costs no commit charge, so a 28 GB checkpoint opens on a 24 GB
    machine (a private copy-on-write mapping of it is refused there); pages are read on first touch.
    The header is untrusted: every entry's dtype, shape and byte range is checked.
    """
    import json
    import warnings

    import numpy as np

    size = path.stat().st_size
    bad = f"{path} is not a readable safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{bad} (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{bad} (header of {n} bytes in a {size}-byte file: truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{bad} (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (header is not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, entry in header.items():
        try:
            dtype = _ST_TORCH[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bad} (entry {name!r} has an unknown dtype or a malformed shape/offsets)") from None
        # Python ints: a lying shape's product cannot overflow here (torch.Size.numel would), and it
        # must match the byte range, which must lie inside the file.
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or base + end > size:
            raise CheckpointError(f"{bad} ({name!r}: bytes {begin}..{end} do not hold {entry['dtype']} {shape} "
                                  f"inside the file; truncated or corrupt)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only on purpose: a checkpoint is never written through
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=base + begin) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _flatten(sd, path: Path) -> dict[str, torch.Tensor]:
    # Training frameworks sometimes wrap the weights: {"model": {...}} or {"state_dict": {...}}.
    if isinstance(sd, Mapping) and len(sd) == 1:
        (only,) = sd.values()
        if isinstance(only, Mapping):
            sd = only
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = v
    return out


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes a module's state dict has (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_problems(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable list of missing, unexpected and mis-shaped keys (empty when it fits)."""
    problems = []
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    misshaped = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k])})"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_listing(misshaped, 6)}")
    return problems


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    hint: str = "",
) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    problems = state_dict_problems(expected, state_dict)
    if problems:
        msg = f"checkpoint does not fit {what}:\n  " + "\n  ".join(problems)
        raise CheckpointError(msg + (f"\n{hint}" if hint else ""))


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load a checked state dict, keeping checkpoint dtypes; works for modules built on `meta`."""
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


# --- the DiT ----------------------------------------------------------------------------------------

WRAPPER_PREFIXES = ("net.", "model.", "module.")


def normalize_wan_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring the known DiT layouts to TurboDiffusion's: strip wrapper prefixes, flatten Conv3d patch weights.

    Views only: nothing is copied, so an mmap'd checkpoint stays on disk.
    """
    out = {}
    for k, v in sd.items():
        for p in WRAPPER_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    w = out.get("patch_embedding.weight")
    if w is not None and w.ndim == 5:  # original Wan: Conv3d [dim, in_dim, kt, kh, kw] == Linear over (c kt kh kw)
        out["patch_embedding.weight"] = w.reshape(w.shape[0], -1)
    return out


def is_quantized(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(".int8_weight") for k in sd)


def wan_signature(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The shape facts that identify a DiT preset, read from a normalised state dict."""
    try:
        pe = sd["patch_embedding.weight"]
        ffn = sd.get("blocks.0.ffn.0.weight", sd.get("blocks.0.ffn.0.int8_weight"))
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        return dict(dim=pe.shape[0], in_dim=pe.shape[1] // 4, ffn_dim=ffn.shape[0], num_layers=layers,
                    text_dim=sd["text_embedding.0.weight"].shape[1])
    except (KeyError, AttributeError, ValueError, IndexError) as e:
        raise CheckpointError(
            "this does not look like a Wan DiT checkpoint: it lacks patch_embedding, text_embedding or blocks "
            f"({e!r}); the first keys are: {_listing(list(sd)[:8], 8)}"
        ) from None


def detect_wan_preset(sd: Mapping[str, torch.Tensor]) -> str | None:
    from turbotrt.core.configs import PRESETS

    sig = wan_signature(sd)
    for name, c in PRESETS.items():
        if all(getattr(c, k) == v for k, v in sig.items()):
            return name
    return None


def build_wan(config, attention=None, quantized: bool = False, device="cpu"):
    """A DiT of the given preset; on `meta` it costs no memory (used to check and to stream weights)."""
    from turbotrt.models.int8 import quantize_linears_
    from turbotrt.models.wan import WanModel

    with torch.device(device):
        model = WanModel(config, attention)
    return quantize_linears_(model) if quantized else model


def load_wan(path, preset: str | None = None, attention=None):
    """Load a TurboDiffusion DiT checkpoint (float or `-quant`) without copying its tensors.

    The model is built on `meta` and takes the checkpoint's (mmap'd) tensors as they are, so the
    dtype is kept and a 28 GB checkpoint is not read into RAM until used.
    """
    from turbotrt.core.configs import get_config

    sd = normalize_wan_state_dict(read_state_dict(path))
    detected = detect_wan_preset(sd)
    name = preset or detected
    if name is None:
        from turbotrt.core.configs import list_configs

        raise CheckpointError(
            f"{path}: no preset has these shapes {wan_signature(sd)}; presets: {', '.join(list_configs())}"
        )
    quant = is_quantized(sd)
    model = build_wan(get_config(name), attention, quant, device="meta")
    hint = f"the checkpoint's shapes fit preset {detected!r}" if detected and detected != name else ""
    check_state_dict(expected_shapes(model), sd, f"preset {name!r}{' (-quant)' if quant else ''}", hint)
    return load_into(model, sd)


def inspect_checkpoint(path) -> dict:
    """Facts about a DiT checkpoint, read from its header and shapes (nothing is computed)."""
    path = Path(path)
    sd = normalize_wan_state_dict(read_state_dict(path))
    dtypes: dict[str, int] = {}
    for v in sd.values():
        dtypes[str(v.dtype).replace("torch.", "")] = dtypes.get(str(v.dtype).replace("torch.", ""), 0) + v.numel()
    preset = detect_wan_preset(sd)
    info = dict(
        path=str(path),
        file_bytes=path.stat().st_size,
        preset=preset,
        quantization="w8a8-int8 (128x128 tiles)" if is_quantized(sd) else "none",
        dtype=max(dtypes, key=dtypes.get) if dtypes else None,
        dtypes=dtypes,
        parameters=sum(v.numel() for v in sd.values()),
        tensor_bytes=sum(v.numel() * v.element_size() for v in sd.values()),
        tensors=len(sd),
        shapes=wan_signature(sd),
    )
    if preset is not None:
        from turbotrt.core.configs import get_config

        expected = expected_shapes(build_wan(get_config(preset), quantized=is_quantized(sd), device="meta"))
        info["problems"] = state_dict_problems(expected, sd)
    return info


def save_state_dict(sd: Mapping[str, torch.Tensor], path) -> Path:
    """Write a state dict atomically (temp file in the same folder, then rename).

    An interrupted write leaves no file under the final name, never a truncated one that looks whole.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tensors = {k: v.contiguous() for k, v in sd.items()}
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors_streaming(entries, path) -> Path:
    """Write a .safetensors file one tensor at a time: entries = [(name, dtype, shape, make)].

    `make()` produces each tensor only when its turn comes, so a checkpoint larger than RAM can be
    written (the header is computed from shapes first). Atomic: temp file, then rename.
    """
    import json

    path = Path(path)
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for name, dtype, shape, make in entries:
                t = make()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(f"{name}: made {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class FilePages:
    """Give back the RAM of an mmap'd checkpoint tensor once it has been used (Linux; else a no-op).

    Pages of a memory-mapped file count towards a process's RSS once touched. Streaming a 28 GB
    checkpoint through an export would therefore look like (and, under pressure, behave like) 28 GB
    resident. After a tensor is written out, madvise(MADV_DONTNEED) drops its pages; they are
    re-read from the file if touched again. Only ranges that /proc/self/maps shows as backed by this
    very file are released, so anonymous memory (whose contents MADV_DONTNEED would zero) is never
    touched.
    """

    MADV_DONTNEED = 4

    def __init__(self, path):
        self.path = str(Path(path).resolve())
        self._ranges: list[tuple[int, int]] = []
        self._libc = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            import ctypes

            self._libc = ctypes.CDLL(None, use_errno=True)
            self._ctypes = ctypes
        except OSError:
            pass

    def _refresh(self) -> None:
        try:
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        ranges = []
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5] == self.path:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
        self._ranges = ranges

    def _mapped(self, lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in self._ranges)

    def release(self, t: torch.Tensor) -> bool:
        if self._libc is None or t.numel() == 0 or t.device.type != "cpu":
            return False
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if not self._mapped(lo, hi):
            self._refresh()
            if not self._mapped(lo, hi):
                return False
        start = lo - lo % self._page
        end = hi + (-hi % self._page)
        end = min(end, next(b for a, b in self._ranges if a <= lo < b))
        return self._libc.madvise(self._ctypes.c_void_p(start), self._ctypes.c_size_t(end - start), self.MADV_DONTNEED) == 0
