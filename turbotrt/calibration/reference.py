"""The PyTorch model of what a quantized bundle's DiT graph computes, read back from the bundle.

A calibrated graph keeps, for each quantized Linear, its codes (`<name>.weight_quantized`, [in, out])
and scales (`<name>.weight_scale`) instead of `<name>.weight`, and quantizes the Linear's input with
the calibration cache's amax. The fake-quant model built from exactly those numbers is what ONNX
Runtime and TensorRT are compared with (`turbotrt validate`); nothing comes from the float bundle.
"""

from __future__ import annotations

import torch

from turbotrt.calibration.cache import load_cache
from turbotrt.calibration.quantize import QuantizedWeight, fake_quant_model
from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import BundleError
from turbotrt.export import dit
from turbotrt.export.onnx_io import GraphWeights
from turbotrt.models.wan import WanModel


def quantized_weights(weights: GraphWeights, names) -> dict[str, QuantizedWeight]:
    out = {}
    for n in names:
        try:
            codes, scale = weights[f"{n}.weight_quantized"], weights[f"{n}.weight_scale"]
        except KeyError:
            raise BundleError(f"{weights.path.name} has no quantized weight for {n}: the manifest's quantization "
                              "does not describe this graph; calibrate again") from None
        out[n] = QuantizedWeight(codes.t().contiguous(), scale.float())
    return out


def fake_quant_dit(bundle: Bundle, network: str, weights: GraphWeights, device="cpu") -> torch.nn.Module:
    """The fake-quant PyTorch DiT of a quantized bundle's `network` graph (fp32 arithmetic)."""
    q = bundle.manifest.quantization
    if q is None or network not in q.networks:
        raise BundleError(f"{bundle.root}: {network} is not quantized")
    config = bundle.model
    qweights = quantized_weights(weights, q.quantized_linears)
    with torch.device("meta"):
        keys = list(WanModel(config).state_dict())
    # Quantized Linears' float weights are not in the graph; their dequantized codes hold the place
    # (fake_quant_model replaces those Linears anyway).
    state = {k: (qweights[k[: -len(".weight")]].dequantize() if k.endswith(".weight") and k[: -len(".weight")] in qweights
                 else weights[k].float()) for k in keys}
    model = dit.reference_model(config, bundle.attention, state, "fp32", device)
    cache = load_cache(bundle.path(q.cache, "quantization.cache"), preset=config.name)
    missing = [n for n in q.quantized_linears if n not in cache.amax]
    if missing:
        raise BundleError(f"{bundle.root}: the calibration cache has no amax for {missing[:3]}; calibrate again")
    return fake_quant_model(model, qweights, cache.amax, q.mode)
