"""The calibration set: the DiT inputs the reference sampler really produces.

For every prompt (T5 embeddings) and seed, the float reference model samples with rCM and each
step's input latent is recorded through `generate_latents(..., callback=)`: step 0 is scaled noise,
the later steps are the re-noised clean estimates of the real trajectory, at the bf16-rounded
timesteps the network sees. Each sample also keeps the float model's velocity and SLA block maps,
and each trajectory its final latent, so the quality report compares against exactly the same
numbers without running the float model again.

Memory: one sample holds a latent (8 MB at 480p/81 frames in fp32) and its block maps (int16, 2 MB
per 30 layers at 480p / 81 frames and topk 0.1); contexts are shared per prompt.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from turbotrt.core.configs import WanConfig
from turbotrt.core.rcm import net_timesteps, rcm_times, timestep_sinusoid


@dataclass
class CalibrationSample:
    prompt: int  # index into CalibrationSet.contexts
    seed: int
    step: int
    timestep: float  # what the network sees (bf16-rounded t * 1000)
    x: Tensor  # fp32 latent [B, C, T, H, W], the DiT input at this step
    velocity: Tensor  # fp32, the float reference's output for x
    block_maps: list[Tensor] = field(default_factory=list)  # int16 [B, H, Nq, n] per SLA layer, in call order

    def t_freq(self, freq_dim: int) -> Tensor:
        return torch.from_numpy(timestep_sinusoid([self.timestep] * self.x.shape[0], freq_dim))

    def inputs(self, data: "CalibrationSet", freq_dim: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(x, t_freq, context) for `forward_from_sinusoid`, on `device`."""
        return self.x.to(device), self.t_freq(freq_dim).to(device), data.contexts[self.prompt].to(device)


@dataclass
class CalibrationSet:
    contexts: list[Tensor]  # fp32 [B, text_len, text_dim] per prompt (samples and contexts stay on the CPU)
    samples: list[CalibrationSample]
    finals: dict[tuple[int, int], Tensor]  # (prompt, seed) -> final fp32 latent of the float sampler
    shape: tuple[int, ...]
    steps: int
    sigma_max: float
    labels: list[str] = field(default_factory=list)  # prompt text, or "embeddings[i]"

    def feeds(self, sample: CalibrationSample, freq_dim: int) -> dict[str, np.ndarray]:
        """ONNX graph inputs for one sample."""
        return {"x": sample.x.numpy(), "t_freq": sample.t_freq(freq_dim).numpy(),
                "context": self.contexts[sample.prompt].numpy()}

    def step_samples(self, step: int) -> list[CalibrationSample]:
        return [s for s in self.samples if s.step == step]


def build_calibration_set(
    model,
    contexts: Sequence[Tensor],
    shape: tuple[int, ...],
    steps: int,
    seeds: Sequence[int],
    sigma_max: float | None = None,
    labels: Sequence[str] | None = None,
    progress: Callable | None = None,
) -> CalibrationSet:
    """Sample every (prompt, seed) with the float `model` and keep each step's DiT input and output."""
    from turbotrt.models.sampler import generate_latents

    config: WanConfig = model.config
    if config.is_i2v:
        raise ValueError(f"{config.name} is image-to-video: calibrating it needs image conditioning, "
                         "which this calibration set does not build")
    sigma_max = config.sigma_max if sigma_max is None else float(sigma_max)
    net_t = net_timesteps(rcm_times(steps, sigma_max))
    device = model_device(model)
    contexts = [c.float().cpu() for c in contexts]
    samples: list[CalibrationSample] = []
    finals = {}
    jobs = [(p, s) for p in range(len(contexts)) for s in seeds]
    for p, seed in (progress(jobs, desc="trajectories") if progress else jobs):
        maps: list[Tensor] = []  # this step's block maps: the callback runs after the step's forward

        def record(i, x, v, p=p, seed=seed):
            samples.append(CalibrationSample(p, int(seed), i, float(net_t[i]), x.float().cpu(), v.float().cpu(),
                                             [m.to(torch.int16).cpu() for m in maps]))
            maps.clear()

        # Noise is drawn on the CPU generator whatever the model's device, as the reference does.
        with block_selections(model, maps):
            finals[(p, int(seed))] = generate_latents(model, contexts[p].to(device), shape, steps=steps,
                                                      seed=int(seed), sigma_max=sigma_max, callback=record).cpu()
    return CalibrationSet(contexts, samples, finals, tuple(shape), steps, sigma_max,
                          list(labels) if labels else [f"embeddings[{i}]" for i in range(len(contexts))])


@contextmanager
def block_selections(model, into: list):
    """Append to `into` the SLA block map (kept key blocks per query block) of every sparse
    self-attention `model` runs while inside."""
    from turbotrt.models.attention import SparseLinearAttention, block_map

    def hook(module, args):
        c = module.config
        into.append(block_map(args[0], args[1], c.block_q, c.block_k, c.topk))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, SparseLinearAttention) and m.config.mode != "dense"]
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# --- text conditioning -----------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> list[Tensor]:
    """[1, text_len, dim] fp32 per prompt, with the T5 reference (zero past each prompt's length)."""
    out = []
    for prompt in prompts:
        ids, mask = tokenizer(prompt)
        out.append(text_encoder(torch.from_numpy(ids), torch.from_numpy(mask)).float())
    return out


def load_embeddings(path: str | os.PathLike, config: WanConfig) -> list[Tensor]:
    """Precomputed T5 embeddings: a .npy or .safetensors of [N, text_len, text_dim] (or one [text_len, text_dim]).

    A .safetensors file may hold one tensor or several (each one prompt or a batch of prompts),
    taken in sorted key order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file not found: {path}")
    if path.suffix == ".npy":
        arrays = [torch.from_numpy(np.load(path, allow_pickle=False))]
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        arrays = [tensors[k] for k in sorted(tensors)]
    else:
        raise ValueError(f"{path}: embeddings must be a .npy or .safetensors file")
    want = (config.text_len, config.text_dim)
    out = []
    for a in arrays:
        a = a.float()
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or tuple(a.shape[1:]) != want:
            raise ValueError(f"{path}: embeddings of shape {tuple(a.shape)}; {config.name} takes "
                             f"[N, {want[0]}, {want[1]}] (N prompts, text_len, text_dim)")
        if not torch.isfinite(a).all():
            raise ValueError(f"{path}: embeddings contain non-finite values")
        out += [row[None].contiguous() for row in a]
    if not out:
        raise ValueError(f"{path}: no embeddings")
    return out


def tiny_text_encoder(config: WanConfig, workdir: str | os.PathLike, seed: int = 0):
    """The tiny presets' T5 reference and tokenizer, as `ReferencePipeline.tiny` builds them."""
    from turbotrt.models.pipeline import ReferencePipeline

    pipe = ReferencePipeline.tiny(config.name, seed=seed, workdir=workdir)
    return pipe.text_encoder, pipe.tokenizer


def load_text_encoder(text_encoder: str | os.PathLike, tokenizer: str | os.PathLike, config: WanConfig):
    """A real umT5 checkpoint and tokenizer (fp32 on the CPU: T5 activations overflow fp16)."""
    from turbotrt.models.t5 import load_t5
    from turbotrt.core.tokenizer import Tokenizer

    encoder = load_t5(text_encoder).float()
    if encoder.cfg.dim != config.text_dim:
        raise ValueError(f"text encoder {encoder.cfg.name} gives dim {encoder.cfg.dim}; {config.name} takes {config.text_dim}")
    return encoder, Tokenizer(tokenizer, text_len=config.text_len)
