"""The Wan VAE's export definitions: four streaming graphs, their causal-conv caches as explicit I/O.

Graphs (static batch B and size; h, w = H/8, W/8; N = the cache length of the preset and size):
    vae_decode_first  z [B,16,1,h,w]                  -> video [B,3,1,H,W], cache_out.0..N-1
    vae_decode_step   z [B,16,1,h,w], cache_in.0..N-1 -> video [B,3,4,H,W], cache_out.0..N-1
    vae_encode_first  video [B,3,1,H,W]                  -> z [B,16,1,h,w], cache_out.0..M-1
    vae_encode_step   video [B,3,4,H,W], cache_in.0..M-1 -> z [B,16,1,h,w], cache_out.0..M-1
A clip of T latent frames is `*_first` once, then `*_step` T-1 times, feeding `cache_out.i` of
each call to `cache_in.i` of the next. `z` is the DiT's (normalised) latent space; `video` is
nominally [-1, 1], unclamped. `spec.extra["cache_layers"][i]` names the layer slot i belongs to
(`decode_cache_spec` / `encode_cache_spec` order).

Dtypes: `z` and `video` are float32 at the boundary; weights, activations and the cache tensors
are in the graph's precision. The cache stays in that precision because it is only ever fed
back, never read, and it is large (about 0.95 G elements for decoding at 480p: half the memory
in fp16/bf16), and because a low-precision graph's cache holds low-precision values anyway.

Each graph has its own `.data` file (the decode pair and the encode pair repeat their weights).
Latent mean/std are 16-value constants inside the graph, not weights.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import onnx
import torch
from torch import nn

from turbotrt.core.configs import ShapeProfile
from turbotrt.core.manifest import GraphSpec, IOSpec, Tolerance
from turbotrt.core.precision import FLOAT_PRECISIONS, NUMPY_DTYPE
from turbotrt.export.networks import NetworkExport, WeightSource, getter, random_feeds, to_torch_input
from turbotrt.export.onnx_io import TracedGraph
from turbotrt.models.checkpoint import check_state_dict, expected_shapes, read_state_dict
from turbotrt.models.dtypes import torch_dtype
from turbotrt.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    STRIDE,
    VAEConfig,
    build_vae,
    check_video_size,
    decode_cache_spec,
    detect_vae_config,
    encode_cache_spec,
    get_vae_config,
)

DECODE_NETWORKS = ("vae_decode_first", "vae_decode_step")
ENCODE_NETWORKS = ("vae_encode_first", "vae_encode_step")  # image-to-video conditioning only
VAE_NETWORKS = DECODE_NETWORKS + ENCODE_NETWORKS

# ONNX Runtime / TensorRT against the PyTorch VAE in the same precision, on video (O(1) values),
# latents (O(1) after normalisation) and the cache outputs alike. Measured on `wan-vae-tiny`: fp32
# ~1e-5, fp16 8e-3 worst (a cache output). bf16 is not runnable on ONNX Runtime's CPU provider; its
# bound is one the bf16 PyTorch VAE itself meets against fp32 (max 0.12, cosine 0.9997).
TOLERANCE = {
    "fp32": Tolerance(1e-4, 1e-4, 0.99999, "same fp32 convolutions, different kernels and summation order"),
    "fp16": Tolerance(2e-2, 1e-2, 0.9999, "fp16 rounding of ~30 stacked convolutions and RMS norms in a different "
                                          "order"),
    "bf16": Tolerance(1e-1, 5e-2, 0.999, "bf16 (8-bit mantissa) rounding of the same convolutions in a different "
                                         "order"),
}

_ONNX_FLOAT = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16}

def _config(config: VAEConfig | str) -> VAEConfig:
    return get_vae_config(config) if isinstance(config, str) else config


def _parse(network: str) -> tuple[str, bool]:
    """("decode" | "encode", first?) of a network name."""
    if network not in VAE_NETWORKS:
        raise ValueError(f"unknown VAE network {network!r}; available: {', '.join(VAE_NETWORKS)}")
    _, kind, step = network.split("_")
    return kind, step == "first"


def spec(config: VAEConfig | str, network: str, height: int, width: int, precision: str,
         batch: int = 1) -> GraphSpec:
    """One streaming graph for video of `height` x `width` pixels (multiples of 8)."""
    cfg = _config(config)
    kind, first = _parse(network)
    if precision not in FLOAT_PRECISIONS:
        raise ValueError(f"the VAE exports in {', '.join(FLOAT_PRECISIONS)}, not {precision!r}")
    h, w = check_video_size(height, width)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    cache = (decode_cache_spec if kind == "decode" else encode_cache_spec)(
        cfg, *((h, w) if kind == "decode" else (height, width)), batch)
    latent = IOSpec("z", (batch, cfg.z_dim, 1, h, w), "float32")
    video = IOSpec("video", (batch, 3, 1 if first else STRIDE[0], height, width), "float32")
    x, y = (latent, video) if kind == "decode" else (video, latent)
    dt = NUMPY_DTYPE[precision]  # the cache stays in the graph's precision (see the module docstring)
    cache_in = () if first else tuple(IOSpec(f"cache_in.{i}", shape, dt) for i, (_, shape) in enumerate(cache))
    cache_out = tuple(IOSpec(f"cache_out.{i}", shape, dt) for i, (_, shape) in enumerate(cache))
    return GraphSpec(
        network, (x, *cache_in), (y, *cache_out), precision, TOLERANCE[precision],
        extra=dict(model=cfg.name, cache_layers=[name for name, _ in cache], cache_dtype=dt,
                   latent_size=[h, w], video_size=[height, width]),
    )


def specs(config: VAEConfig | str, profile: ShapeProfile, precision: str,
          networks: Iterable[str] = VAE_NETWORKS) -> dict[str, GraphSpec]:
    return {n: spec(config, n, profile.height, profile.width, precision, profile.batch) for n in networks}


class _Stream(nn.Module):
    """Graph entry point: one streaming call, fp32 at the boundary, the cache as flat tensors."""

    def __init__(self, model: nn.Module, network: str):
        super().__init__()
        self.model = model
        self.method = network.removeprefix("vae_")

    def forward(self, x, *cache):
        fn = getattr(self.model, self.method)
        x = x.to(self.model.dtype)
        y, cache = fn(x, cache) if cache else fn(x)
        return (y.float(), *cache)


def _inline_latent_stats(traced: TracedGraph, weight_names: set[str]) -> None:
    """Turn the latent mean/std into constants inside the graph.

    They are tensors the model creates in forward, so the exporter declares them as initializers
    (`lifted_tensor_<i>`), which a meta trace leaves without values. `_latent_stats` creates the
    mean before the std, which is the order the exporter numbers them in.
    """
    lifted = [s for s in traced.weights if s.name not in weight_names]
    if len(lifted) != 2 or any(s.shape != (len(LATENT_MEAN),) for s in lifted):
        raise RuntimeError(f"expected the latent mean and std as the only non-weight constants of the VAE graph; "
                           f"found {[(s.name, s.shape) for s in lifted]}")
    renames = {}
    for slot, name, values in zip(lifted, ("latent_mean", "latent_std"), (LATENT_MEAN, LATENT_STD)):
        raw = torch.tensor(values, dtype=slot.dtype).view(torch.uint8).numpy().tobytes()  # the model's rounding
        tensor = onnx.helper.make_tensor(name, _ONNX_FLOAT[slot.dtype], list(slot.shape), raw, raw=True)
        traced.model.graph.initializer.append(tensor)
        renames[slot.name] = name
    for node in traced.model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    traced.weights[:] = [s for s in traced.weights if s.name in weight_names]


def definitions(config: VAEConfig | str, profile: ShapeProfile, precision: str, weights: WeightSource,
                networks: Iterable[str] = DECODE_NETWORKS) -> list[NetworkExport]:
    """One NetworkExport per streaming graph (each graph carries its own copy of the weights it uses)."""
    cfg = _config(config)
    out = []
    for network, graph in specs(cfg, profile, precision, networks).items():
        out.append(NetworkExport(
            graph, "vae",
            build=lambda network=network: _Stream(build_vae(cfg, "meta").to(torch_dtype(precision)), network),
            weights=weights,
            reference=lambda graph=graph: reference(cfg, graph, weights),
            feeds=lambda seed, graph=graph: random_feeds(graph, seed),
            finish=lambda traced: _inline_latent_stats(traced, set(expected_shapes(build_vae(cfg, "meta")))),
            summary=f"{cfg.name}, {precision}",
        ))
    return out


def checkpoint_weights(path: str | os.PathLike, config: VAEConfig | str) -> Callable[[str], torch.Tensor]:
    """Name -> tensor from an mmap'd `Wan2.1_VAE.pth`, after checking every key and shape up front
    (CheckpointError names the missing, unexpected and mis-shaped ones)."""
    cfg = _config(config)
    sd = read_state_dict(path)
    detected = detect_vae_config(sd)
    hint = f"the checkpoint fits preset {detected.name!r}" if detected and detected != cfg else ""
    check_state_dict(expected_shapes(build_vae(cfg, "meta")), sd, f"VAE preset {cfg.name!r} ({path})", hint)
    return sd.__getitem__


def reference(config: VAEConfig | str, spec: GraphSpec, weights: WeightSource) -> Callable[[dict], dict]:
    """PyTorch run of what one graph computes, for `validate_onnx`: feeds -> outputs by name."""
    cfg = _config(config)
    dtype = torch_dtype(spec.precision)
    model = build_vae(cfg, "meta")
    get = getter(weights)
    model.load_state_dict({k: get(k).to(dtype) for k in model.state_dict()}, assign=True)
    step = _Stream(model.eval().requires_grad_(False), spec.network)

    @torch.no_grad()
    def run(feeds):
        args = [to_torch_input(feeds[n]) for n in spec.input_names]
        outs = step(args[0], *(a.to(dtype) for a in args[1:]))
        return {name: t.float().numpy() for name, t in zip(spec.output_names, outs)}

    return run
