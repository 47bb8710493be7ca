"""DiT export: trace the model on `meta`, stream weights from the checkpoint, attach SageSLA's body."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from turbotrt.export.configs import ExportSpec
from turbotrt.export.onnx_graph import OPSET, attach_function, name_nodes_by_module, trace, write_model
from turbotrt.models.attention import AttentionConfig
from turbotrt.models.checkpoint import (
    FilePages,
    check_state_dict,
    detect_wan_preset,
    expected_shapes,
    is_quantized,
    normalize_wan_state_dict,
    read_state_dict,
)
from turbotrt.models.configs import WanConfig
from turbotrt.models.wan import DTYPES, WanModel

DTYPE_OF = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Step(nn.Module):
    """The graph's entry point: WanModel.forward_from_sinusoid (the timestep sinusoid is an input)."""

    def __init__(self, model: WanModel):
        super().__init__()
        self.model = model

    def forward(self, x, t_freq, context, y=None):
        return self.model.forward_from_sinusoid(x, t_freq, context, y)


def meta_model(config: WanConfig, attention: AttentionConfig, precision: str) -> WanModel:
    with torch.device("meta"):
        model = WanModel(config, attention)
    return model.to(DTYPE_OF[precision]).eval()


def checkpoint_weights(path: str | os.PathLike, config: WanConfig) -> Callable[[str], torch.Tensor]:
    """Name -> tensor, read lazily from an mmap'd checkpoint (float or `-quant`).

    `-quant` int8 weights are dequantized tile by tile when asked for, one tensor at a time: the
    float graph gets W = int8 * scale (its own W8A8 path is calibration's job).
    """
    from turbotrt.models.int8 import dequantize_tiles

    sd = normalize_wan_state_dict(read_state_dict(path))
    detected = detect_wan_preset(sd)
    expected = expected_shapes(build_meta_checked(config, is_quantized(sd)))
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
    return get


def build_meta_checked(config: WanConfig, quantized: bool) -> nn.Module:
    from turbotrt.models.checkpoint import build_wan

    return build_wan(config, quantized=quantized, device="meta")


def export_dit(
    config: WanConfig,
    spec: ExportSpec,
    attention: AttentionConfig,
    path: str | os.PathLike,
    weights: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    progress=None,
) -> Path:
    """Write `path` (+ `.data`): the DiT step graph for one static shape profile."""
    model = meta_model(config, attention, spec.precision)
    args = tuple(torch.empty(i.shape, dtype=torch.float32, device="meta") for i in spec.inputs)
    traced = trace(_Step(model), args, spec.input_names, spec.output_names)
    _strip_prefix(traced, "model.")
    name_nodes_by_module(traced.model, strip="model.")
    if attention.mode != "dense":
        from turbotrt.export.sagesla_onnx import attrs_for, function_body

        q_shape = (spec.inputs[0].shape[0], config.num_heads, spec.extra["seq_len"], config.head_dim)
        attach_function(traced.model, function_body(q_shape, DTYPE_OF[spec.precision], attrs_for(q_shape, attention), OPSET))
    return write_model(traced, path, weights, progress)


def _strip_prefix(traced, prefix: str) -> None:
    """Initializer names become the checkpoint's own (`blocks.0.self_attn.q.weight`)."""
    renames = {s.name: s.name.removeprefix(prefix) for s in traced.weights}
    for node in traced.model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    traced.weights[:] = [type(s)(renames[s.name], s.dtype, s.shape) for s in traced.weights]


def random_weights(config: WanConfig, seed: int = 0, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The built-in tiny model's seeded weights (the same on every machine)."""
    from turbotrt.models.wan import random_wan_state_dict

    if dtype not in DTYPES:
        raise ValueError(dtype)
    return random_wan_state_dict(config, seed=seed, dtype=dtype)
