"""What the server needs to know about a bundle, read once from its manifest (no graphs loaded)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from turbotrt.core.bundle import MANIFEST, Bundle

# Which graphs each stage runs, by name prefix; a replica loads only its own.
STAGE_GRAPHS = {
    "text_encoder": ("text_encoder",),
    "image_encoder": ("vae_encode",),
    "denoiser": ("dit",),
    "decoder": ("vae_decode",),
}


@dataclass(frozen=True)
class BundleFacts:
    path: str  # absolute: replicas on other nodes open the same path
    name: str
    i2v: bool
    width: int
    height: int
    frames: int
    text_len: int
    tokenizer: str
    digest: str  # sha256 of manifest.json, which itself holds the sha256 of every file
    networks: tuple[str, ...]

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "BundleFacts":
        bundle = Bundle.load(path, verify=verify)
        model, profile = bundle.model, bundle.profile
        return cls(
            path=str(Path(path).resolve()),
            name=model.name,
            i2v=model.is_i2v,
            width=profile.width,
            height=profile.height,
            frames=profile.frames,
            text_len=model.text_len,
            tokenizer=str(bundle.tokenizer.resolve()),
            digest=hashlib.sha256((bundle.root / MANIFEST).read_bytes()).hexdigest(),
            networks=tuple(bundle.networks),
        )

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this bundle needs, in the order a job runs them."""
        return ("text_encoder", "image_encoder", "denoiser", "decoder") if self.i2v else (
            "text_encoder", "denoiser", "decoder")

    def graphs(self, stage: str) -> list[str]:
        return [n for n in self.networks if n.startswith(STAGE_GRAPHS[stage])]
