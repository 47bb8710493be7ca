"""`turbotrt validate BUNDLE`: every graph against the PyTorch reference, then the whole pipeline.

The reference takes its weights from the bundle itself (the ONNX initializers are named like the
checkpoint), so a bundle validates without its checkpoints. Stages:
  1. per graph: ONNX Runtime vs PyTorch on seeded inputs, per-output tolerances from the manifest;
  2. per graph: TensorRT vs ONNX Runtime, where TensorRT and engines for this GPU exist;
  3. end to end: the runtime vs the reference pipeline for one prompt and seed (latent cosine, PSNR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from turbotrt.bundle import Bundle
from turbotrt.export.configs import ExportSpec, IOSpec, Tolerance
from turbotrt.export.validate import ValidationReport, compare, random_feeds, run_onnxruntime
from turbotrt.models.attention import AttentionConfig
from turbotrt.models.configs import get_config


def spec_from_manifest(d: dict) -> ExportSpec:
    io = lambda items: tuple(IOSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in items)  # noqa: E731
    return ExportSpec(d["network"], io(d["inputs"]), io(d["outputs"]), d["precision"], Tolerance(**d["tolerance"]),
                      d.get("extra", {}))


def bundle_weights(path: Path) -> dict[str, torch.Tensor]:
    """The external initializers of one graph, by checkpoint key."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(Path(path).parent))  # one tensor at a time
            arr = numpy_helper.to_array(t)
            if arr.dtype.name == "bfloat16":  # ml_dtypes' bf16 has no torch equivalent in numpy
                arr = arr.astype(np.float32)
            out[t.name] = torch.from_numpy(np.array(arr))
    return out


@dataclass
class BundleValidation:
    graphs: list[ValidationReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    end_to_end: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed or r.skipped for r in self.graphs) and self.end_to_end.get("passed", True)


def _reference_fn(bundle: Bundle, network: str, spec: ExportSpec, weights):
    model = bundle.model
    precision = spec.precision
    if network.startswith("dit"):
        from turbotrt.export.api import _dit_reference

        att = AttentionConfig(**bundle.manifest["attention"])
        return _dit_reference(get_config(model["name"]), att, weights, precision)
    if network == "text_encoder":
        from turbotrt.export.text_encoder import t5_reference

        return t5_reference(model["text_encoder"], weights, precision)
    from turbotrt.export.vae import vae_reference

    return vae_reference(model["vae"], spec, vae_weights(bundle))


def vae_weights(bundle: Bundle) -> dict[str, torch.Tensor]:
    """Decoder weights from the decode graphs, encoder weights from the encode graphs (I2V); a
    text-to-video bundle ships no encoder, whose slots are zero-filled (the decode graphs never use them)."""
    from turbotrt.models.checkpoint import expected_shapes
    from turbotrt.models.vae import build_vae

    sd = {}
    for network in bundle.networks:
        if network.startswith("vae_"):
            sd.update(bundle_weights(bundle.graph(network)))
    for k, shape in expected_shapes(build_vae(bundle.model["vae"], "meta")).items():
        sd.setdefault(k, torch.zeros(shape))
    return sd


def reference_pipeline(bundle: Bundle, attention_mode: str | None = None):
    """The PyTorch reference pipeline with the bundle's own weights and tokenizer."""
    from turbotrt.models.pipeline import ReferencePipeline
    from turbotrt.models.t5 import build_t5
    from turbotrt.models.tokenizer import Tokenizer
    from turbotrt.models.vae import build_vae
    from turbotrt.models.wan import WanModel

    config = get_config(bundle.model["name"])
    att = dict(bundle.manifest["attention"])
    if attention_mode:
        att["mode"] = attention_mode
    experts = config.experts or ("",)
    dits = {}
    for e in experts:
        m = WanModel(config, AttentionConfig(**att))
        m.load_state_dict(bundle_weights(bundle.graph(f"dit_{e}" if e else "dit")))
        dits[e] = m.eval()
    t5 = build_t5(config.text_encoder, "cpu")
    t5.load_state_dict(bundle_weights(bundle.graph("text_encoder")))
    vae = build_vae(config.vae, "cpu").eval()
    vae.load_state_dict(vae_weights(bundle))
    tok = Tokenizer(bundle.tokenizer, text_len=config.text_len)
    return ReferencePipeline(config, dits if config.experts else dits[""], t5, tok, vae)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def validate_bundle(path, prompt: str = "a red bird flies over a river at night", seed: int = 0, steps: int = 4,
                    log=print) -> BundleValidation:
    bundle = Bundle.load(path)
    result = BundleValidation()
    for network in bundle.networks:
        spec = spec_from_manifest(bundle.spec(network))
        report = ValidationReport(network, spec.precision, "onnxruntime:CPUExecutionProvider", spec.tolerance)
        if spec.precision == "bf16":
            report.skipped = "ONNX Runtime's CPU provider has no bf16 kernels"
        else:
            feeds = random_feeds(spec, seed)
            if network.startswith("dit"):
                from turbotrt.runtime.rcm import timestep_sinusoid

                feeds["t_freq"] = timestep_sinusoid([988.0] * spec.inputs[0].shape[0], bundle.model["freq_dim"])
            if network == "text_encoder":
                from turbotrt.export.text_encoder import t5_feeds

                feeds = t5_feeds(spec, seed=seed)
            weights = bundle_weights(bundle.graph(network))
            compare(run_onnxruntime(bundle.graph(network), feeds), _reference_fn(bundle, network, spec, weights)(feeds),
                    report)
        result.graphs.append(report)
        log(report.format())
    try:
        import tensorrt  # noqa: F401

        result.skipped.append("TensorRT vs ONNX Runtime: run `turbotrt run --backend trt` on the target GPU "
                              "(engines are compared per graph there)")
    except ImportError:
        result.skipped.append("TensorRT vs ONNX Runtime: skipped, TensorRT is not installed here")
    log(result.skipped[-1])

    needed = {"text_encoder", "vae_decode_first", "vae_decode_step"}
    if not needed <= set(bundle.networks) or bundle.manifest.get("tokenizer") is None:
        result.skipped.append("end to end: skipped, the bundle lacks the text encoder, VAE or tokenizer")
        log(result.skipped[-1])
        return result
    if bundle.model["in_dim"] != bundle.model["out_dim"]:
        result.skipped.append("end to end: skipped for image-to-video bundles (needs an image)")
        log(result.skipped[-1])
        return result
    if any(r.skipped for r in result.graphs):
        result.skipped.append("end to end: skipped, ONNX Runtime cannot run this precision on a CPU")
        log(result.skipped[-1])
        return result
    from turbotrt.runtime.pipeline import Pipeline

    runtime = Pipeline.from_bundle(path, backend="ort", verify=False, log=lambda *_: None)
    out = runtime(prompt, seed=seed, steps=steps)
    # ONNX Runtime runs SageSLA's float body, so the reference is the same geometry in `sla` mode.
    mode = "sla" if bundle.manifest["attention"]["mode"] == "sagesla" else None
    ref = reference_pipeline(bundle, mode)(prompt, seed=seed, steps=steps, noise="numpy")
    a, b = out.latents.astype(np.float64).ravel(), ref.latents.numpy().astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    video_psnr = psnr(out.frames, ref.frames)
    # fp32: the same math, ~1e-6 apart; fp16: rounding compounds over the steps.
    min_cos = 0.9999 if bundle.manifest["precision"] == "fp32" else 0.99
    result.end_to_end = dict(prompt=prompt, seed=seed, steps=steps, latent_cosine=cosine, latent_rel_l2=rel,
                             video_psnr_db=video_psnr, passed=bool(cosine >= min_cos), min_cosine=min_cos)
    log(f"end to end ({steps} steps, seed {seed}): latent cosine {cosine:.7f}, rel L2 {rel:.2e}, "
        f"video PSNR {video_psnr:.1f} dB -> {'PASS' if cosine >= min_cos else 'FAIL'} (cosine >= {min_cos})")
    return result
