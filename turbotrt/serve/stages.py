"""The runtime's stages as Ray Serve deployments, each scaled and placed on its own.

Every replica holds a `Pipeline` (the same class `turbotrt run` uses) and calls one of its stage
methods, so the served numbers are the runtime's numbers: no second copy of the rCM loop or the
VAE stepping lives here. Graphs load lazily in Pipeline; a replica loads its own graphs when it
starts, so a broken bundle fails the deployment rather than the first request.

Stage methods are async and run the graphs with `asyncio.to_thread`: the replica's event loop
stays free for Ray Serve's health checks however long a step takes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve

from turbotrt.runtime.pipeline import Pipeline, Result
from turbotrt.core.video import latents_video_to_uint8
from turbotrt.serve.facts import BundleFacts

logger = logging.getLogger("ray.serve")


class _Stage:
    stage = ""

    def __init__(self, facts: BundleFacts, backend: str, verify: bool):
        self.pipe = Pipeline.from_bundle(facts.path, backend=backend, verify=verify, log=logger.info)
        for graph in facts.graphs(self.stage):
            self.pipe.backend.session(graph)

    async def describe(self) -> dict:
        return {"stage": self.stage, "backend": self.pipe.backend.describe(), "node": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


@serve.deployment
class TextEncoder(_Stage):
    stage = "text_encoder"

    def __init__(self, facts: BundleFacts, backend: str, verify: bool):
        super().__init__(facts, backend, verify)
        self.pipe.tokenizer  # noqa: B018 -- load the sentencepiece model now, not on the first request

    async def encode(self, prompt: str) -> dict:
        return await _timed(self.pipe.encode_prompt, prompt)


@serve.deployment
class ImageEncoder(_Stage):
    stage = "image_encoder"

    async def encode(self, image: np.ndarray) -> dict:
        return await _timed(self.pipe.encode_image, image)


@serve.deployment
class Denoiser(_Stage):
    stage = "denoiser"

    async def sample(self, context: np.ndarray, seed: int, steps: int, y: np.ndarray | None, ode: bool):
        """Streams {"step": done, "steps": n} after each step, then {"latents": ..., "timings": ...}."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        timings: dict[str, float] = {}

        def on_step(done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"step": done, "steps": total})

        def run() -> np.ndarray:
            try:
                return self.pipe.sample(context, seed, steps, y=y, ode=ode, timings=timings, on_step=on_step)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, None)  # after every step event: the loop keeps order

        work = asyncio.ensure_future(asyncio.to_thread(run))
        while (event := await events.get()) is not None:
            yield event
        yield {"latents": await work, "timings": timings}


@serve.deployment
class Decoder(_Stage):
    stage = "decoder"

    async def decode(self, latents: np.ndarray) -> dict:
        """Latents -> the mp4's bytes, encoded as `Result.save` (what `turbotrt run` writes)."""
        return await _timed(self._mp4, latents)

    def _mp4(self, latents: np.ndarray) -> bytes:
        frames = latents_video_to_uint8(self.pipe.decode(latents))
        with tempfile.TemporaryDirectory() as tmp:
            return Result(frames, latents).save(Path(tmp) / "video.mp4").read_bytes()


STAGE_DEPLOYMENTS = {"text_encoder": TextEncoder, "image_encoder": ImageEncoder, "denoiser": Denoiser,
                     "decoder": Decoder}


async def _timed(fn, *args) -> dict:
    start = time.perf_counter()
    out = await asyncio.to_thread(fn, *args)
    return {"out": out, "seconds": time.perf_counter() - start}
