"""`turbotrt validate BUNDLE`: every graph against the PyTorch reference, then the whole pipeline.

The reference takes its weights from the bundle itself (the ONNX initializers are named like the
checkpoint; a quantized DiT's codes and scales rebuild its fake-quant model), so a bundle validates
without its checkpoints. Stages:
  1. per graph: ONNX Runtime vs PyTorch on seeded inputs, names, then shapes, then values, with the
     graph's tolerance (a quantized DiT: against the fake-quant model of the same Q/DQ numbers);
  2. per graph: TensorRT vs ONNX Runtime, where TensorRT and engines for this GPU exist; and what
     TensorRT for RTX's parser and builder say about it, where `tensorrt_rtx` is installed (it
     builds without a GPU: a graph it refuses is a failed check);
  3. end to end: the runtime vs the reference pipeline for one prompt and seed (latent cosine,
     PSNR); an image-to-video bundle is conditioned on a fixed synthetic image. For a quantized
     bundle the quality report's figures against the float model are shown too.
A check that cannot run here is listed in `skipped`; the command then does not say "valid".

Bundle validation sits above export and calibration (it uses both), beside the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import TurbotrtError
from turbotrt.core.manifest import Tolerance
from turbotrt.export import dit, text_encoder, vae
from turbotrt.export.networks import NetworkExport, family_of, to_torch_input
from turbotrt.export.onnx_io import GraphWeights
from turbotrt.export.validate import ValidationReport, compare, run_onnxruntime

# A Q/DQ graph in ONNX Runtime against the PyTorch fake-quant model of the same scales and codes:
# both quantize on the same grid, so they agree to fp32 rounding except where that rounding moves a
# value across a quantization step or changes an SLA block selection (measured on the tiny int8 and
# fp8 bundles: max |a-b| / max|b| ~1e-2, cosine > 0.9999).
QDQ_TOLERANCE = Tolerance(5e-2, 5e-2, 0.999, "Q/DQ in ONNX Runtime vs fake quantization in PyTorch: same grid, "
                                             "rounding-boundary flips and SLA block reselection")
# The SageSLA plugin computes the op in INT8/FP8 where the ONNX function body is exact: engines with
# it are held to the low-bit error the attention tests bound (a few 1e-3 relative), not fp32 rounding.
PLUGIN_TOLERANCE = Tolerance(5e-2, 5e-2, 0.999, "the SageSLA plugin's INT8 Q/K and FP8 P/V against the float body")


def graph_weights(bundle: Bundle, network: str) -> GraphWeights:
    """The initializers of one graph (named like the checkpoint), its external data checked first."""
    data = bundle.data(network)
    return GraphWeights(bundle.graph(network), data.name if data else None)


def vae_weights(bundle: Bundle) -> dict[str, torch.Tensor]:
    """Decoder weights from the decode graphs, encoder weights from the encode graphs (I2V); a
    text-to-video bundle ships no encoder, whose slots are zero-filled (the decode graphs never use them)."""
    from turbotrt.models.checkpoint import expected_shapes
    from turbotrt.models.vae import build_vae

    expected = expected_shapes(build_vae(bundle.model.vae, "meta"))
    sd = {}
    for network in bundle.networks:
        if network.startswith("vae_"):
            w = graph_weights(bundle, network)
            sd.update({k: w[k] for k in w.names() if k in expected})
    for k, shape in expected.items():
        sd.setdefault(k, torch.zeros(shape))
    return sd


def is_quantized(bundle: Bundle, network: str) -> bool:
    q = bundle.manifest.quantization
    return q is not None and network in q.networks


def dit_model(bundle: Bundle, network: str, attention_mode: str | None = None) -> torch.nn.Module:
    """The PyTorch DiT of one of the bundle's DiT graphs: the fp32 reference, or the fake-quant model."""
    weights = graph_weights(bundle, network)
    if is_quantized(bundle, network):
        from turbotrt.calibration.reference import fake_quant_dit

        return fake_quant_dit(bundle, network, weights)
    att = bundle.attention if attention_mode is None else bundle.attention.replace(mode=attention_mode)
    return dit.reference_model(bundle.model, att, weights, "fp32")


def definition(bundle: Bundle, network: str) -> NetworkExport:
    """The export definition of one of the bundle's graphs, with the bundle's own weights: its
    `reference()` is the PyTorch model of what ONNX Runtime runs, `feeds(seed)` its sample inputs."""
    spec = bundle.spec(network)
    family = family_of(network)
    if family == "dit":
        weights = {n: graph_weights(bundle, n) for n in dit.network_names(bundle.model)}
        nets = dit.definitions(bundle.model, bundle.profile, bundle.attention, spec.precision, weights)
        net = next(n for n in nets if n.network == network)
        if is_quantized(bundle, network):
            model = dit_model(bundle, network)

            @torch.no_grad()
            def run(feeds):
                args = [to_torch_input(feeds[n]).float() for n in ("x", "t_freq", "context", "y") if n in feeds]
                return {"velocity": model.forward_from_sinusoid(*args).float().numpy()}

            net = dataclasses.replace(net, spec=dataclasses.replace(net.spec, tolerance=QDQ_TOLERANCE),
                                      reference=lambda: run)
        return net
    if family == "text_encoder":
        return text_encoder.definition(bundle.model.text_encoder, spec.precision, graph_weights(bundle, network))
    return vae.definitions(bundle.model.vae, bundle.profile, spec.precision, vae_weights(bundle), [network])[0]


@dataclass
class BundleValidation:
    graphs: list[ValidationReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    end_to_end: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)  # the quality report's figures, for quantized bundles
    rtx: dict = field(default_factory=dict)  # network -> what TensorRT for RTX's parser and builder said

    @property
    def passed(self) -> bool:
        return (all(r.passed or r.skipped for r in self.graphs) and self.end_to_end.get("passed", True)
                and all(r["passed"] for r in self.rtx.values()))


def reference_pipeline(bundle: Bundle, attention_mode: str | None = None):
    """The PyTorch reference pipeline with the bundle's own weights and tokenizer."""
    from turbotrt.core.tokenizer import Tokenizer
    from turbotrt.models.pipeline import ReferencePipeline
    from turbotrt.models.t5 import build_t5
    from turbotrt.models.vae import build_vae

    config = bundle.model
    dits = {e: dit_model(bundle, n, attention_mode) for e, n in zip(config.experts or ("",), dit.network_names(config))}
    t5 = build_t5(config.text_encoder, "cpu")
    w = graph_weights(bundle, "text_encoder")
    t5.load_state_dict({k: w[k].float() for k in t5.state_dict()})
    vae_model = build_vae(config.vae, "cpu").eval()
    vae_model.load_state_dict(vae_weights(bundle))
    tok = Tokenizer(bundle.tokenizer, text_len=config.text_len)
    return ReferencePipeline(config, dits if config.experts else dits[""], t5, tok, vae_model)


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A fixed first frame for image-to-video checks: smooth colour gradients (uint8 [H, W, 3])."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin(x / 7.0 + y / 5.0)], -1)
    return np.round(rgb * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _engines_vs_onnxruntime(bundle: Bundle, seed: int, result: BundleValidation, log) -> None:
    """Each engine built for this GPU against ONNX Runtime on the same inputs (needs the engine's
    TensorRT, or TensorRT for RTX, and the GPU)."""
    flavours = sorted({e.flavour for es in bundle.manifest.engines.values() for e in es})
    if not flavours:
        log("engines vs ONNX Runtime: the bundle has no engines (`turbotrt build` makes them)")
        return
    from turbotrt.runtime.backends import RtxBackend, TrtBackend

    for flavour in flavours:
        try:
            backend = (TrtBackend if flavour == "tensorrt" else RtxBackend)(bundle)
        except TurbotrtError as e:
            result.skipped.append(f"{flavour} engines vs ONNX Runtime: skipped ({e})")
            log(result.skipped[-1])
            continue
        for network in bundle.networks:
            spec = bundle.spec(network)
            try:
                engine_session = backend.session(network)
            except TurbotrtError as e:
                result.skipped.append(f"{flavour} vs ONNX Runtime, {network}: skipped ({e})")
                log(result.skipped[-1])
                continue
            uses_plugin = any(e.attention == "sagesla-plugin" for e in bundle.manifest.engines.get(network, [])
                              if e.flavour == flavour)
            tolerance = PLUGIN_TOLERANCE if uses_plugin else spec.tolerance
            report = ValidationReport(network, spec.precision, f"{flavour}:{backend.cc}", tolerance)
            feeds = definition(bundle, network).feeds(seed)
            compare(engine_session.run(feeds), run_onnxruntime(bundle.graph(network), feeds), report)
            result.graphs.append(report)
            log(report.format())


RTX_CHECK_TARGET = "sm_89"  # the RTX target every graph kind builds for (FP8 included)


def _rtx_check(bundle: Bundle, result: BundleValidation, log) -> None:
    """Each graph through TensorRT for RTX's parser and builder (no GPU needed): what they say."""
    import time

    from turbotrt.build.rtx import build_plan_bytes, installed_version

    version = installed_version()
    if version is None:
        log("TensorRT for RTX: not installed, its parser and builder were not asked (pip install 'turbotrt[rtx]')")
        return
    for network in bundle.networks:
        t0 = time.perf_counter()
        try:
            data = build_plan_bytes(bundle.checked_graph(network), [RTX_CHECK_TARGET], log=lambda *_: None)
        except TurbotrtError as e:
            result.rtx[network] = dict(passed=False, target=RTX_CHECK_TARGET, version=version, error=str(e))
            log(f"TensorRT for RTX {version}, {network}: FAIL: {e}")
            continue
        seconds = time.perf_counter() - t0
        result.rtx[network] = dict(passed=True, target=RTX_CHECK_TARGET, version=version, seconds=round(seconds, 2),
                                   engine_bytes=len(data))
        log(f"TensorRT for RTX {version}, {network}: parses and builds for {RTX_CHECK_TARGET} "
            f"({len(data) / 2**20:.1f} MiB engine, {seconds:.1f} s)")


def validate_bundle(path, prompt: str = "a red bird flies over a river at night", seed: int = 0, steps: int = 4,
                    rtx: bool = True, log=print) -> BundleValidation:
    """rtx: also ask TensorRT for RTX's parser and builder about every graph (when installed)."""
    bundle = Bundle.load(path)
    result = BundleValidation()
    for network in bundle.networks:
        spec = bundle.spec(network)
        net = definition(bundle, network)
        precision = f"{bundle.precision} Q/DQ over {spec.precision}" if is_quantized(bundle, network) else spec.precision
        report = ValidationReport(network, precision, "onnxruntime:CPUExecutionProvider", net.spec.tolerance)
        if spec.precision == "bf16":
            report.skipped = ("ONNX Runtime's CPU provider has no bf16 kernels: validate on an NVIDIA GPU, or export "
                              "fp32/fp16 to check the math on a CPU")
            result.skipped.append(f"{network}: {report.skipped}")
        else:
            feeds = net.feeds(seed)
            compare(run_onnxruntime(bundle.graph(network), feeds), net.reference()(feeds), report)
        result.graphs.append(report)
        log(report.format())
    _engines_vs_onnxruntime(bundle, seed, result, log)
    if rtx:
        _rtx_check(bundle, result, log)
    _quality_report(bundle, result, log)

    needed = {"text_encoder", "vae_decode_first", "vae_decode_step"}
    if not needed <= set(bundle.networks) or bundle.manifest.tokenizer is None:
        result.skipped.append("end to end: skipped, the bundle lacks the text encoder, VAE or tokenizer")
        log(result.skipped[-1])
        return result
    if any(r.skipped for r in result.graphs):
        result.skipped.append("end to end: skipped, ONNX Runtime cannot run this precision on a CPU")
        log(result.skipped[-1])
        return result
    from turbotrt.runtime.pipeline import Pipeline

    p = bundle.profile
    image = synthetic_image(p.height, p.width) if bundle.model.is_i2v else None
    runtime = Pipeline.from_bundle(path, backend="ort", verify=False, log=lambda *_: None)
    out = runtime(prompt, seed=seed, steps=steps, image=image)
    # ONNX Runtime runs SageSLA's float body, so the reference is the same geometry in `sla` mode.
    mode = dit.reference_attention(bundle.attention).mode
    ref = reference_pipeline(bundle, mode)(prompt, seed=seed, steps=steps, image=image, noise="philox")
    a, b = out.latents.astype(np.float64).ravel(), ref.latents.numpy().astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    video_psnr = psnr(out.frames, ref.frames)
    # fp32: the same math, ~1e-6 apart; fp16 and Q/DQ: rounding compounds over the steps.
    min_cos = 0.9999 if bundle.precision == "fp32" else 0.99
    result.end_to_end = dict(prompt=prompt, seed=seed, steps=steps, latent_cosine=cosine, latent_rel_l2=rel,
                             video_psnr_db=video_psnr, passed=bool(cosine >= min_cos), min_cosine=min_cos,
                             reference="fake-quant" if bundle.manifest.quantization else "fp32")
    log(f"end to end ({steps} steps, seed {seed}, vs the {result.end_to_end['reference']} reference pipeline): "
        f"latent cosine {cosine:.7f}, rel L2 {rel:.2e}, video PSNR {video_psnr:.1f} dB -> "
        f"{'PASS' if cosine >= min_cos else 'FAIL'} (cosine >= {min_cos})")
    return result


def _quality_report(bundle: Bundle, result: BundleValidation, log) -> None:
    """For a quantized bundle: what its quality report measured against the float model at calibration."""
    q = bundle.manifest.quantization
    if q is None:
        return
    try:
        report = json.loads(bundle.path(q.report, "quantization.report").read_text())
        finals = {f["backend"]: f for f in report.get("final_latent", [])}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        log(f"quantization ({q.mode}): its quality report could not be read")
        return
    result.quantization = dict(mode=q.mode, observer=q.observer, final_latent=finals)
    for backend, f in finals.items():
        log(f"quantization ({q.mode}, {q.observer}) vs float, final latent ({backend}, calibration time): "
            f"cosine mean {f.get('cosine_mean', float('nan')):.6f}, relative error mean "
            f"{f.get('rel_error_mean', float('nan')):.2e}")
