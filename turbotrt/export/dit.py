"""The DiT's export definition: one rCM step, (x, t_freq, context[, y]) -> velocity.

All graph I/O is fp32; weights and activations inside are the graph's precision, with norms,
modulation and the head in fp32. Self-attention becomes one `turbodiffusion::SageSLA` node per
layer (sla/sagesla), whose function body is attached after the trace. Weights stream from the
checkpoint (float or W8A8 `-quant`, dequantized tile by tile) into the graph's external data.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from turbotrt.core.configs import AttentionConfig, ShapeProfile, WanConfig
from turbotrt.core.manifest import GraphSpec, IOSpec, Tolerance
from turbotrt.core.precision import FLOAT_PRECISIONS
from turbotrt.core.rcm import timestep_sinusoid
from turbotrt.export.networks import NetworkExport, WeightSource, getter, random_feeds, to_torch_input
from turbotrt.export.onnx_io import OPSET, TracedGraph, attach_function
from turbotrt.models.checkpoint import (
    FilePages,
    build_wan,
    check_state_dict,
    detect_wan_preset,
    expected_shapes,
    is_quantized,
    normalize_wan_state_dict,
    read_state_dict,
)
from turbotrt.models.dtypes import torch_dtype
from turbotrt.models.wan import WanModel

# ONNX Runtime runs the same ops as the PyTorch reference; differences are summation order (fp32)
# or the low-precision rounding of intermediate tensors in a different order (fp16/bf16).
TOLERANCE = {
    "fp32": Tolerance(1e-4, 1e-3, 0.99999, "same fp32 math, different kernels and summation order"),
    "fp16": Tolerance(5e-2, 5e-2, 0.999, "fp16 rounding of linears/attention in a different order"),
    "bf16": Tolerance(1e-1, 1e-1, 0.995, "bf16 (8-bit mantissa) rounding in a different order"),
}
VALIDATION_TIMESTEP = 988.0  # the first step's net timestep at sigma_max 80: the noisiest input


def network_names(config: WanConfig) -> list[str]:
    """`dit`, or one graph per expert (`dit_high`, `dit_low`)."""
    return [f"dit_{e}" for e in config.experts] if config.experts else ["dit"]


def spec(config: WanConfig, profile: ShapeProfile, precision: str, network: str = "dit") -> GraphSpec:
    if precision not in FLOAT_PRECISIONS:
        raise ValueError(f"the DiT graph is exported in {', '.join(FLOAT_PRECISIONS)} (int8/fp8 come from "
                         f"calibration), not {precision!r}")
    b = profile.batch
    latent = (b, *profile.latent_shape(config.out_dim))
    inputs = [
        IOSpec("x", latent, "float32"),
        IOSpec("t_freq", (b, config.freq_dim), "float32"),
        IOSpec("context", (b, config.text_len, config.text_dim), "float32"),
    ]
    if config.is_i2v:
        inputs.append(IOSpec("y", (b, config.in_dim - config.out_dim, *latent[2:]), "float32"))
    return GraphSpec(network, tuple(inputs), (IOSpec("velocity", latent, "float32"),), precision,
                     TOLERANCE[precision], extra=dict(seq_len=profile.seq_len(config.patch_size)))


class Step(nn.Module):
    """The graph's entry point: WanModel.forward_from_sinusoid (the timestep sinusoid is an input)."""

    def __init__(self, model: WanModel):
        super().__init__()
        self.model = model

    def forward(self, x, t_freq, context, y=None):
        return self.model.forward_from_sinusoid(x, t_freq, context, y)


def reference_attention(attention: AttentionConfig) -> AttentionConfig:
    """What ONNX Runtime runs: SageSLA's function body is the exact-softmax sparse core, so a sagesla
    graph's reference is the `sla` model of the same geometry."""
    return attention.replace(mode="sla") if attention.mode == "sagesla" else attention


def reference_model(config: WanConfig, attention: AttentionConfig, weights: WeightSource, precision: str = "fp32",
                    device="cpu") -> WanModel:
    """The PyTorch model of what ONNX Runtime runs for `attention`, with `weights`, in `precision`."""
    with torch.device("meta"):
        model = WanModel(config, reference_attention(attention))
    get = getter(weights)
    model.load_state_dict({k: get(k).float() for k in model.state_dict()}, strict=True, assign=True)
    return model.to(device=device, dtype=torch_dtype(precision)).eval().requires_grad_(False)


def reference(config: WanConfig, attention: AttentionConfig, weights: WeightSource, precision: str) -> Callable:
    model = reference_model(config, attention, weights, precision)

    @torch.no_grad()
    def run(feeds):
        args = [to_torch_input(feeds[n]) for n in ("x", "t_freq", "context", "y") if n in feeds]
        return {"velocity": model.forward_from_sinusoid(*args).float().numpy()}

    return run


def feeds(graph: GraphSpec, config: WanConfig, seed: int) -> dict[str, np.ndarray]:
    """Random latents and context, and a real timestep's sinusoid (random t_freq is no timestep)."""
    f = random_feeds(graph, seed)
    f["t_freq"] = timestep_sinusoid([VALIDATION_TIMESTEP] * graph.inputs[0].shape[0], config.freq_dim)
    return f


def definitions(config: WanConfig, profile: ShapeProfile, attention: AttentionConfig, precision: str,
                weights: dict[str, WeightSource]) -> list[NetworkExport]:
    """One NetworkExport per DiT graph; `weights` maps each network name to its weights."""
    from turbotrt.core import sagesla as C

    if attention.mode == "sagesla" and config.head_dim not in C.HEAD_DIMS:
        raise ValueError(f"sagesla supports head_dim {C.HEAD_DIMS}; {config.name} has {config.head_dim}")
    out = []
    for network in network_names(config):
        graph = spec(config, profile, precision, network)

        def build(graph=graph):
            from turbotrt.export.sagesla_onnx import swap_for_export

            with torch.device("meta"):
                model = WanModel(config, attention)
            swap_for_export(model)
            return Step(model.to(torch_dtype(graph.precision)).eval())

        def finish(traced: TracedGraph, graph=graph):
            if attention.sparse:
                from turbotrt.export.sagesla_onnx import attrs_for, function_body

                q_shape = (graph.inputs[0].shape[0], config.num_heads, graph.extra["seq_len"], config.head_dim)
                attach_function(traced.model, function_body(q_shape, torch_dtype(graph.precision),
                                                            attrs_for(q_shape, attention), OPSET))

        w = weights[network]
        out.append(NetworkExport(
            graph, "dit", build, w,
            reference=lambda w=w, graph=graph: reference(config, attention, w, graph.precision),
            feeds=lambda seed, graph=graph: feeds(graph, config, seed), finish=finish,
            summary=f"{config.name} at {profile.name} ({graph.extra['seq_len']} tokens), {precision}, attention "
                    f"{attention.mode} {attention.block_q}/{attention.block_k} topk {attention.topk}",
        ))
    return out


# --- weight sources ----------------------------------------------------------------------------------------

def checkpoint_weights(path: str | os.PathLike, config: WanConfig) -> Callable[[str], torch.Tensor]:
    """Name -> tensor, read lazily from an mmap'd checkpoint (float or `-quant`), after checking every
    key and shape (CheckpointError names the missing, unexpected and mis-shaped ones).

    `-quant` int8 weights are dequantized tile by tile when asked for, one tensor at a time: the
    float graph gets W = int8 * scale.
    """
    from turbotrt.models.int8 import dequantize_tiles

    sd = normalize_wan_state_dict(read_state_dict(path))
    detected = detect_wan_preset(sd)
    expected = expected_shapes(build_wan(config, quantized=is_quantized(sd), device="meta"))
    hint = f"the checkpoint's shapes fit preset {detected!r}" if detected and detected != config.name else ""
    check_state_dict(expected, sd, f"preset {config.name!r}", hint)
    pages = FilePages(path)

    def sources(name: str) -> list[str]:
        stem = name.removesuffix(".weight")
        return [name] if name in sd else [f"{stem}.int8_weight", f"{stem}.scale"]

    def get(name: str) -> torch.Tensor:
        if name in sd:
            return sd[name]
        src = sources(name)
        if src[0] in sd:
            return dequantize_tiles(sd[src[0]], sd[src[1]])
        raise KeyError(f"checkpoint has no tensor for {name}")

    def release(name: str) -> None:
        """Called once a weight is on disk: its checkpoint pages leave this process's RSS."""
        for key in sources(name):
            if key in sd:
                pages.release(sd[key])

    get.release = release
    get.quantized = is_quantized(sd)
    return get


def random_weights(config: WanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The built-in tiny model's seeded weights (the same on every machine)."""
    from turbotrt.models.wan import random_wan_state_dict

    return random_wan_state_dict(config, seed=seed, dtype="fp32")
