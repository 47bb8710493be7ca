"""The reference pipeline: prompt (and image) -> umT5 -> rCM latents with the DiT -> Wan VAE -> frames.

This is what a deployed bundle's output is compared with: same prompt, same seed, same numbers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from turbotrt.core.configs import AttentionConfig, ShapeProfile, WanConfig, default_profile, get_config, shape_profile
from turbotrt.core.tokenizer import Tokenizer, make_tiny_tokenizer
from turbotrt.core.video import FPS, latents_video_to_uint8, write_mp4
from turbotrt.models.sampler import generate_latents
from turbotrt.models.t5 import T5Encoder, build_t5, random_t5_state_dict
from turbotrt.models.vae import WanVAE, build_vae, random_vae_state_dict
from turbotrt.models.wan import WanModel, init_random_


@dataclass
class Video:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: torch.Tensor  # fp32 [1, 16, T_lat, H/8, W/8], what the DiT produced
    fps: int = FPS
    info: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        return write_mp4(self.frames, path, self.fps)


def i2v_condition(vae: WanVAE, image: np.ndarray, profile: ShapeProfile) -> torch.Tensor:
    """y = cat(mask [4 ch, 1 on latent frame 0], vae.encode(cat(image, zeros for frames 1..F-1))).

    image: uint8 [h, w, 3], resized (antialiased bilinear) to the profile's size and mapped to [-1, 1].
    """
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    img = F.interpolate(img, size=(profile.height, profile.width), mode="bilinear", antialias=True, align_corners=False)
    video = torch.zeros(1, 3, profile.frames, profile.height, profile.width)
    video[:, :, 0] = img[0]
    latents = vae.encode(video.to(vae.dtype)).float()
    mask = torch.zeros(1, 4, *latents.shape[2:])
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


class ReferencePipeline:
    """`pipeline(prompt, seed=0, steps=4) -> Video` with the PyTorch reference networks."""

    def __init__(self, config: WanConfig, dit: WanModel | Mapping[str, WanModel], text_encoder: T5Encoder,
                 tokenizer: Tokenizer, vae: WanVAE):
        self.config, self.dit, self.text_encoder, self.tokenizer, self.vae = config, dit, text_encoder, tokenizer, vae
        if text_encoder.cfg.dim != config.text_dim:
            raise ValueError(f"text encoder {text_encoder.cfg.name} gives dim {text_encoder.cfg.dim}, "
                             f"but {config.name} takes text_dim {config.text_dim}")

    @classmethod
    def tiny(cls, preset: str = "wan-tiny", seed: int = 0, workdir: str | os.PathLike = ".",
             attention: AttentionConfig | None = None) -> "ReferencePipeline":
        """The built-in tiny model with seeded random weights (and a tokenizer trained on the fly in workdir)."""
        config = get_config(preset)
        if not config.name.startswith("wan-tiny"):
            raise ValueError(f"{preset} is not a tiny preset; load real checkpoints instead")
        attention = attention or AttentionConfig.for_model(config)
        experts = config.experts or ("",)
        dits = {e: init_random_(WanModel(config, attention), seed + i).eval() for i, e in enumerate(experts)}
        dit = dits if config.experts else dits[""]
        t5 = build_t5(config.text_encoder, "cpu")
        t5.load_state_dict(random_t5_state_dict(config.text_encoder, seed))
        vae = build_vae(config.vae, "cpu").eval().requires_grad_(False)
        vae.load_state_dict(random_vae_state_dict(config.vae, seed))
        tokenizer = Tokenizer(make_tiny_tokenizer(Path(workdir) / "tokenizer", seed=seed), text_len=config.text_len)
        return cls(config, dit, t5, tokenizer, vae)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        ids, mask = self.tokenizer(prompt)
        return self.text_encoder(torch.from_numpy(ids), torch.from_numpy(mask))

    @torch.no_grad()
    def __call__(self, prompt: str, seed: int = 0, steps: int = 4, profile: ShapeProfile | None = None,
                 image: np.ndarray | None = None, ode: bool = False, noise_device="cpu", noise: str = "torch") -> Video:
        cfg = self.config
        profile = profile or default_profile(cfg)
        if cfg.is_i2v and image is None:
            raise ValueError(f"{cfg.name} is image-to-video: pass an image")
        if not cfg.is_i2v and image is not None:
            raise ValueError(f"{cfg.name} is text-to-video: it takes no image")
        context = self.encode_prompt(prompt)
        y = i2v_condition(self.vae, image, profile) if image is not None else None
        shape = (1, *profile.latent_shape(cfg.out_dim))
        latents = generate_latents(self.dit, context, shape, steps=steps, seed=seed, y=y, ode=ode,
                                   noise_device=noise_device, noise=noise)
        video = self.vae.decode(latents.to(self.vae.dtype)).float()
        return Video(latents_video_to_uint8(video.numpy()), latents,
                     info=dict(prompt=prompt, seed=seed, steps=steps, profile=profile.name))


def generate(preset: str, prompt: str, out: str | os.PathLike, seed: int = 0, steps: int = 4,
             resolution: str | None = None, frames: int | None = None, workdir=None) -> Video:
    """Tiny-preset convenience: build the reference pipeline and write an mp4."""
    config = get_config(preset)
    profile = shape_profile(resolution or config.default_resolution, frames or config.default_frames, config=config)
    with tempfile.TemporaryDirectory() as tmp:  # the tiny tokenizer is loaded, then not needed on disk
        pipe = ReferencePipeline.tiny(preset, seed=0, workdir=workdir or tmp)
    video = pipe(prompt, seed=seed, steps=steps, profile=profile)
    video.save(out)
    return video
