"""The umT5 text encoder's export definition: trace on `meta`, stream the weights from the checkpoint.

Graph `text_encoder` (static batch and `text_len`):
    ids   int32 [B, text_len]  token ids, right-padded with 0 (TensorRT indexes with int32)
    mask  int32 [B, text_len]  1 on prompt tokens (EOS included), 0 on padding
 -> context float32 [B, text_len, dim], exactly zero where mask is 0

Inside, weights and activations are fp32 or bf16 (RMS statistics and softmax in fp32, as the
PyTorch encoder runs them). fp16 is refused: umT5 activations overflow it. Both int32 inputs are
used as they are (Gather takes int32 indices, the mask is only compared with 0), so no Cast is needed.
Initializers are named like the checkpoint's keys (`blocks.0.attn.q.weight`) and live in
`text_encoder.onnx.data`; the relative-position bucket table is a constant folded into the graph.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from turbotrt.core.manifest import GraphSpec, IOSpec, Tolerance
from turbotrt.export.networks import NetworkExport, WeightSource, getter
from turbotrt.models.checkpoint import CheckpointError, check_state_dict, expected_shapes, read_state_dict
from turbotrt.models.dtypes import torch_dtype
from turbotrt.models.t5 import T5Config, build_t5, detect_t5_config, get_t5_config

NETWORK = "text_encoder"
PRECISIONS = ("fp32", "bf16")

# ONNX Runtime / TensorRT against the PyTorch encoder in the same precision. Outputs are O(1) (the
# final RMS norm), so the absolute terms are meaningful on their own. Measured on `umt5-tiny`: fp32
# ~1e-6; bf16 is not runnable on ONNX Runtime's CPU provider, so its bound is one the bf16 PyTorch
# encoder itself meets against fp32 (max 0.036, cosine 0.99997): two bf16 runs should agree better.
TOLERANCE = {
    "fp32": Tolerance(1e-4, 1e-4, 0.99999, "same fp32 math, different GEMM kernels and summation order"),
    "bf16": Tolerance(1e-1, 5e-2, 0.999, "bf16 (8-bit mantissa) rounding of projections and the residual stream "
                                         "in a different order, compounded over the layers"),
}

def _config(config: T5Config | str) -> T5Config:
    return get_t5_config(config) if isinstance(config, str) else config


def check_precision(precision: str) -> str:
    if precision == "fp16":
        raise ValueError(
            "the text encoder cannot be exported in fp16: umT5 activations overflow fp16 (the residual stream "
            "grows past 65504 and turns into inf/NaN); use bf16 (the released weights' dtype) or fp32"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"the text encoder exports in {' or '.join(PRECISIONS)}, not {precision!r}")
    return precision


def spec(config: T5Config | str, precision: str, batch: int = 1) -> GraphSpec:
    """The `text_encoder` graph for `batch` prompts of `config.text_len` tokens."""
    cfg = _config(config)
    check_precision(precision)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    tokens = (batch, cfg.text_len)
    return GraphSpec(
        NETWORK,
        (IOSpec("ids", tokens, "int32"), IOSpec("mask", tokens, "int32")),
        (IOSpec("context", (*tokens, cfg.dim), "float32"),),
        precision,
        TOLERANCE[precision],
        extra=dict(model=cfg.name, text_len=cfg.text_len, vocab_size=cfg.vocab_size, pad_id=0),
    )


class _Encode(nn.Module):
    """Graph entry point: the encoder, with its output widened to the fp32 boundary."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(ids, mask).float()


def definition(config: T5Config | str, precision: str, weights: WeightSource, batch: int = 1) -> NetworkExport:
    cfg = _config(config)
    graph = spec(cfg, precision, batch)
    return NetworkExport(
        graph, "text_encoder",
        build=lambda: _Encode(build_t5(cfg, "meta").to(torch_dtype(precision))),
        weights=weights,
        reference=lambda: reference(cfg, weights, precision),
        feeds=lambda seed: feeds(graph, seed=seed),
        summary=f"{cfg.name}, {precision}",
    )


def checkpoint_weights(path: str | os.PathLike, config: T5Config | str) -> Callable[[str], torch.Tensor]:
    """Name -> tensor from an mmap'd umT5 checkpoint, after checking every key and shape up front
    (CheckpointError names the missing, unexpected and mis-shaped ones)."""
    cfg = _config(config)
    sd = read_state_dict(path)
    try:
        detected = detect_t5_config(sd)
    except CheckpointError:
        detected = None
    hint = f"the checkpoint's shapes fit preset {detected.name!r}" if detected and detected != cfg else ""
    check_state_dict(expected_shapes(build_t5(cfg, "meta")), sd, f"umT5 encoder {cfg.name!r} ({path})", hint)

    def get(name: str) -> torch.Tensor:
        try:
            return sd[name]
        except KeyError:
            raise CheckpointError(f"{path}: no tensor {name!r} for the umT5 encoder") from None

    return get


def reference_model(config: T5Config | str, weights: WeightSource, precision: str = "fp32") -> nn.Module:
    """The PyTorch encoder with `weights` in `precision`: `(ids, mask) -> context`."""
    cfg = _config(config)
    model = build_t5(cfg, "meta")
    get = getter(weights)
    model.load_state_dict({k: get(k).to(torch_dtype(precision)) for k in model.state_dict()}, assign=True)
    return model.eval().requires_grad_(False)


def reference(config: T5Config | str, weights: WeightSource, precision: str) -> Callable[[dict], dict]:
    """PyTorch run of what the graph computes, for `validate_onnx`: feeds -> {"context": fp32}."""
    model = reference_model(config, weights, precision)

    @torch.no_grad()
    def run(feeds):
        ids, mask = (torch.from_numpy(np.asarray(feeds[n])).long() for n in ("ids", "mask"))
        return {"context": model(ids, mask).float().numpy()}

    return run


def feeds(spec: GraphSpec, prompt_lens: Sequence[int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds shaped like the tokenizer's: random ids on a prefix of each row, then padding."""
    b, length = spec.inputs[0].shape
    rng = np.random.default_rng(seed)
    lens = list(prompt_lens) if prompt_lens is not None else [int(x) for x in rng.integers(1, length + 1, b)]
    if len(lens) != b or not all(1 <= n <= length for n in lens):
        raise ValueError(f"need {b} prompt lengths in 1..{length}, got {lens}")
    mask = (np.arange(length)[None, :] < np.array(lens)[:, None]).astype(np.int32)
    ids = rng.integers(1, spec.extra["vocab_size"], (b, length)).astype(np.int32) * mask
    return {"ids": ids, "mask": mask}
