"""One declarative export definition per network (optimum-style), and the one function that exports it.

A `NetworkExport` says everything about one graph: its spec (inputs, outputs, static shapes,
dtypes, tolerance), how to build the entry module on `meta`, where its weights come from, the
PyTorch reference of what ONNX Runtime runs, seeded sample feeds, and the graph passes after the
trace. `export_graph` is the same four steps for every network (trace, name, finish, stream the
weights); `turbotrt.export.api` loops over definitions, and validation and calibration take their
references from the same definitions.

Adding a network: a module with a `definitions(...)` function returning NetworkExports (see
dit.py, text_encoder.py, vae.py) and a line in `FAMILIES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn  # noqa: F401  (NetworkExport.build returns a module)

from turbotrt.core.manifest import GraphSpec
from turbotrt.export.onnx_io import TracedGraph, name_nodes_by_module, strip_prefix, trace, write_model
from turbotrt.models.dtypes import torch_dtype

WeightSource = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]
Reference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def getter(weights: WeightSource) -> Callable[[str], torch.Tensor]:
    return weights.__getitem__ if isinstance(weights, Mapping) else weights


@dataclass
class NetworkExport:
    spec: GraphSpec
    family: str  # "dit" | "text_encoder" | "vae": which module defines it
    build: Callable[[], nn.Module]  # the graph's entry module on `meta`, in the graph's precision
    weights: WeightSource  # checkpoint key -> tensor (a checkpoint, the tiny seeded weights, a bundle)
    reference: Callable[[], Reference]  # the PyTorch model of what ONNX Runtime runs, built on demand
    feeds: Callable[[int], dict[str, np.ndarray]]  # seed -> sample inputs
    finish: Callable[[TracedGraph], None] = field(default=lambda traced: None)  # passes after the trace
    summary: str = ""  # one line for the log

    @property
    def network(self) -> str:
        return self.spec.network


def export_graph(net: NetworkExport, path: str | os.PathLike, progress=None) -> Path:
    """Write `path` (+ `.data`): trace the entry module on `meta`, name nodes by module, run the
    network's own passes, then stream its weights from `net.weights` one tensor at a time."""
    args = tuple(torch.empty(i.shape, dtype=torch_dtype(i.dtype), device="meta") for i in net.spec.inputs)
    traced = trace(net.build(), args, net.spec.input_names, net.spec.output_names)
    strip_prefix(traced, "model.")
    net.finish(traced)
    name_nodes_by_module(traced.model, strip="model.")
    return write_model(traced, path, net.weights, progress)


def random_feeds(spec: GraphSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: i.random(rng) for i in spec.inputs}


def to_torch_input(a) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # numpy has no bf16 of its own (ml_dtypes does): reinterpret the bits
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


FAMILIES = ("dit", "text_encoder", "vae")


def family_of(network: str) -> str:
    if network.startswith("dit"):
        return "dit"
    if network.startswith("vae_"):
        return "vae"
    if network == "text_encoder":
        return "text_encoder"
    raise ValueError(f"unknown network {network!r}")
