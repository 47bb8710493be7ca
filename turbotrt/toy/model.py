"""The trained toy model shipped with the package: where its files are, and how it becomes a bundle.

`weights/` holds one file per network in the layout of the real checkpoints, so they load through
the same code (`turbotrt.models.checkpoint.load_wan`, `load_t5`, `load_vae`) and export like a real
model: `turbotrt export turbotrt/toy/weights/dit.safetensors --text-encoder .../umt5.safetensors
--vae .../vae.safetensors --tokenizer .../spiece.model`. The tokenizer is the tiny presets' one.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_FILE = "dit.safetensors"  # wan-tiny, TurboDiffusion's keys, bf16 (SLA proj_l fp32)
VAE_FILE = "vae.safetensors"  # wan-vae-tiny, Wan2.1_VAE.pth's keys
T5_FILE = "umt5.safetensors"  # umt5-tiny, Wan's umT5 encoder keys
TOKENIZER_FILE = "spiece.model"
PRESET = "wan-tiny"


def weight_paths(root: str | os.PathLike = WEIGHTS_DIR) -> dict[str, Path]:
    root = Path(root)
    paths = dict(dit=root / DIT_FILE, vae=root / VAE_FILE, text_encoder=root / T5_FILE, tokenizer=root / TOKENIZER_FILE)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the toy model's files are missing: {', '.join(missing)} "
                                "(train them with `python -m turbotrt.toy.train`)")
    return paths


def export_toy(out: str | os.PathLike, root: str | os.PathLike = WEIGHTS_DIR, **options):
    """Export the trained toy model to a bundle at `out` (options as `turbotrt.export.api.export`)."""
    from turbotrt.export.api import export

    p = weight_paths(root)
    return export(str(p["dit"]), out, text_encoder=str(p["text_encoder"]), vae=str(p["vae"]),
                  tokenizer=str(p["tokenizer"]), **options)
