"""The lean runtime: prompt -> tokens -> umT5 -> rCM steps with the DiT -> VAE step by step -> mp4.

Imports numpy, the core (bundle, tokenizer, schedule, noise, video) and a backend; never torch. The
numbers follow the PyTorch reference pipeline (`turbotrt.models.pipeline`): the same schedule, the
same float64 sampler state, the same Philox noise (`turbotrt.core.noise`), so outputs can be
compared for one seed (and with the C++ runtime, which implements the same steps).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from turbotrt.core.bundle import Bundle
from turbotrt.core.noise import NoiseStream
from turbotrt.core.rcm import (
    expert_for_step,
    net_timesteps,
    ode_step,
    rcm_times,
    sde_step,
    timestep_sinusoid,
    validate_steps,
)
from turbotrt.core.video import FPS, latents_video_to_uint8, write_mp4
from turbotrt.runtime.backends import make_backend


@dataclass
class Result:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    latents: np.ndarray  # fp32 [1, 16, T_lat, h, w]
    timings: dict = field(default_factory=dict)  # stage -> seconds
    fps: int = FPS

    def save(self, path: str | os.PathLike) -> Path:
        return write_mp4(self.frames, path, self.fps)


class Pipeline:
    """`Pipeline.from_bundle(path)(prompt, seed=0, steps=4) -> Result` (`.save("video.mp4")`)."""

    def __init__(self, bundle: Bundle, backend):
        self.bundle, self.backend = bundle, backend
        self.model = bundle.model
        self._tokenizer = None
        self._starting: ThreadPoolExecutor | None = None

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str = "auto", verify: bool = True, log=print) -> "Pipeline":
        bundle = Bundle.load(path, verify=verify)
        return cls(bundle, make_backend(bundle, backend, log))

    def start_sessions(self) -> None:
        """Create every graph's session in the background, all at once, if the backend allows it (ONNX
        Runtime): the first run then waits for the slowest graph, not for the sum of all of them, and the
        text encoder's is usually ready by the time the prompt is tokenized. A failure surfaces, with its
        usual message, where that session is first used."""
        if self._starting is not None or not getattr(self.backend, "concurrent_start", False):
            return
        networks = self.bundle.networks
        self._starting = ThreadPoolExecutor(max_workers=len(networks), thread_name_prefix="turbotrt-session")
        for network in networks:
            self._starting.submit(self.backend.session, network)
        self._starting.shutdown(wait=False)

    # --- stages -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from turbotrt.core.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.bundle.tokenizer, text_len=self.model.text_len)
        return self._tokenizer

    def encode_prompt(self, prompt: str) -> np.ndarray:
        ids, mask = self.tokenizer(prompt)
        out = self.backend.session("text_encoder").run({"ids": ids.astype(np.int32), "mask": mask.astype(np.int32)})
        return out["context"]

    def _dit(self, t_cur: float) -> str:
        expert = expert_for_step(t_cur, self.model.boundary, self.model.experts)
        return f"dit_{expert}" if expert else "dit"

    def sample(self, context: np.ndarray, seed: int, steps: int, y: np.ndarray | None = None, ode: bool = False,
               timings: dict | None = None, on_step=None) -> np.ndarray:
        """rCM in float64 as the reference does; the DiT sees fp32 x and the timestep's sinusoid.

        on_step(done, total) is called after each step (progress for servers and UIs)."""
        steps = validate_steps(steps)
        times = rcm_times(steps, self.model.sigma_max)
        net_t = net_timesteps(times)
        shape = self.bundle.spec(self._dit(float(times[0]))).input("x").shape
        noise = NoiseStream(seed)
        x = noise(shape).astype(np.float64) * times[0]
        for i in range(steps):
            t0 = time.perf_counter()
            t_cur, t_next = float(times[i]), float(times[i + 1])
            feeds = {"x": x.astype(np.float32), "context": context,
                     "t_freq": timestep_sinusoid([net_t[i]] * shape[0], self.model.freq_dim)}
            if y is not None:
                feeds["y"] = y
            v = self.backend.session(self._dit(t_cur)).run(feeds)["velocity"].astype(np.float64)
            x = ode_step(x, v, t_cur, t_next) if ode else sde_step(x, v, t_cur, t_next, noise(shape).astype(np.float64))
            if timings is not None:
                timings[f"step_{i}"] = time.perf_counter() - t0
            if on_step is not None:
                on_step(i + 1, steps)
        return x.astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [1, 16, T, h, w] -> video [1, 3, 1 + 4(T-1), H, W], one latent frame per graph call."""
        first = self.backend.session("vae_decode_first").run({"z": latents[:, :, :1]})
        videos, cache = [first["video"]], _caches(first)
        step = self.backend.session("vae_decode_step") if latents.shape[2] > 1 else None
        for t in range(1, latents.shape[2]):
            out = step.run({"z": latents[:, :, t:t + 1], **{k.replace("cache_out", "cache_in"): v for k, v in cache.items()}})
            videos.append(out["video"])
            cache = _caches(out)
        return np.concatenate(videos, axis=2)

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """I2V conditioning y = cat(mask, VAE(image then zeros)); the image must be the profile's size."""
        p = self.bundle.profile
        h, w, frames = p.height, p.width, p.frames
        image = np.asarray(image)
        if image.shape != (h, w, 3) or image.dtype != np.uint8:
            raise ValueError(f"the bundle was exported for {w}x{h}: pass a uint8 [{h}, {w}, 3] image "
                             f"(got {image.dtype} {image.shape}); resize it first")
        x0 = (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None]
        first = self.backend.session("vae_encode_first").run({"video": x0})
        zs, cache = [first["z"]], _caches(first)
        step = self.backend.session("vae_encode_step")
        zeros = np.zeros((1, 3, 4, h, w), np.float32)
        for _ in range((frames - 1) // 4):
            out = step.run({"video": zeros, **{k.replace("cache_out", "cache_in"): v for k, v in cache.items()}})
            zs.append(out["z"])
            cache = _caches(out)
        z = np.concatenate(zs, axis=2)
        mask = np.zeros((1, 4, *z.shape[2:]), np.float32)
        mask[:, :, 0] = 1.0
        return np.concatenate([mask, z], axis=1)

    # --- all of it ------------------------------------------------------------------------------------
    def __call__(self, prompt: str, seed: int = 0, steps: int = 4, image: np.ndarray | None = None,
                 ode: bool = False) -> Result:
        i2v = self.model.is_i2v
        if i2v and image is None:
            raise ValueError(f"{self.model.name} is image-to-video: pass an image")
        if not i2v and image is not None:
            raise ValueError(f"{self.model.name} is text-to-video: it takes no image")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.start_sessions()
        context = self.encode_prompt(prompt)
        timings["text"] = time.perf_counter() - t0
        y = None
        if image is not None:
            t0 = time.perf_counter()
            y = self.encode_image(image)
            timings["image"] = time.perf_counter() - t0
        latents = self.sample(context, seed, steps, y, ode, timings)
        t0 = time.perf_counter()
        video = self.decode(latents)
        timings["vae"] = time.perf_counter() - t0
        return Result(latents_video_to_uint8(video), latents, timings)


def _caches(outputs: dict) -> dict:
    return {k: v for k, v in outputs.items() if k.startswith("cache_out.")}
