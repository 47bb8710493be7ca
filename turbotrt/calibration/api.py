"""`calibrate()`: a float DiT (an exported bundle, or a preset / checkpoint exported on the way) ->
a bundle whose DiT graph carries explicit INT8 or FP8 Q/DQ, with its calibration cache and report.

Steps: the float reference samples real rCM trajectories (the calibration set); SmoothQuant, when
asked, measures per-channel maxima and folds its factors where that is exact; observers measure
every block Linear's input; weights are quantized per output channel (INT8) or per tensor (FP8),
from a `-quant` checkpoint's int8 tiles when there is one; Q/DQ goes into the graph; ONNX Runtime
and the fake-quant PyTorch model are compared with the float model per step and over the whole loop.

The output is written through `BundleWriter` (a partial folder committed whole, cleaned on every
exit path): nothing goes to a temporary folder elsewhere, and the source bundle's files are copied,
never linked, so the source stays exactly as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from turbotrt.calibration import observers as obs
from turbotrt.calibration.cache import CalibrationCache, load_cache
from turbotrt.calibration.config import QuantConfig, file_digest
from turbotrt.calibration.dataset import (
    CalibrationSet,
    build_calibration_set,
    encode_prompts,
    load_embeddings,
    model_device,
)
from turbotrt.calibration.qdq import insert_qdq
from turbotrt.calibration.quantize import conversion_error, fake_quant_model, quantize_weight
from turbotrt.calibration.report import OrtDit, QuantReport, final_quality, step_quality
from turbotrt.calibration.smoothquant import apply_smoothing, skipped_sites, smooth_sites, smoothing_factors
from turbotrt.core.bundle import Bundle, BundleWriter
from turbotrt.core.configs import AttentionConfig, ShapeProfile, WanConfig, list_configs
from turbotrt.core.errors import TurbotrtError
from turbotrt.core.manifest import Quantization
from turbotrt.export import dit
from turbotrt.export.api import ExportResult, plan_export, small, write_graphs
from turbotrt.export.lint import lint
from turbotrt.export.networks import getter
from turbotrt.export.onnx_io import GraphWeights
from turbotrt.models.wan import WanModel

CACHE_FILE = "calibration_cache.json"
REPORT_FILE = "quant_report.json"
NETWORK = "dit"


class CalibrationError(TurbotrtError):
    pass


@dataclass
class DitSource:
    """The float DiT being calibrated: where its graph is, what it is, and its weights."""

    config: WanConfig
    profile: ShapeProfile
    attention: AttentionConfig
    precision: str  # the float graph's type
    graph: Path
    data: str | None  # its external-data file name
    weights: Callable[[str], torch.Tensor]  # checkpoint key -> float tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.profile.batch, *self.profile.latent_shape(self.config.out_dim))


def _iterate(progress, items, desc: str):
    return progress(items, desc=desc) if progress else items


def _state_dict_names(config: WanConfig) -> list[str]:
    with torch.device("meta"):
        return list(WanModel(config).state_dict())


def checkpoint_tiles(path: str, config: WanConfig, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (int8 codes [out, in], tile scales) of a TurboDiffusion `-quant` checkpoint."""
    from turbotrt.models.checkpoint import is_quantized, normalize_wan_state_dict, read_state_dict

    sd = normalize_wan_state_dict(read_state_dict(path))
    if not is_quantized(sd):
        raise CalibrationError(f"{path} is a float checkpoint: its weights are already in the bundle "
                               "(give a -quant checkpoint to start from its int8 weights)")
    out = {}
    for n in names:
        if f"{n}.int8_weight" not in sd:
            raise CalibrationError(f"{path} has no {n}.int8_weight: not a -quant checkpoint of {config.name}?")
        out[n] = (sd[f"{n}.int8_weight"], sd[f"{n}.scale"].float())
    return out


def text_contexts(config: WanConfig, qcfg: QuantConfig, embeddings, text_weights, tokenizer_path, text_encoder_name):
    """(contexts, labels): the config's prompts through the umT5 reference, or an embeddings file's rows."""
    if embeddings is not None:
        ctx = load_embeddings(embeddings, config)
        return ctx, [f"{Path(embeddings).name}[{i}]" for i in range(len(ctx))]
    if text_weights is None or tokenizer_path is None:
        raise CalibrationError(
            f"calibrating {config.name} needs prompt embeddings: give the umT5 checkpoint and its tokenizer "
            "(--text-encoder, --tokenizer), a bundle that carries both, or precomputed embeddings (--embeddings)")
    from turbotrt.core.tokenizer import Tokenizer
    from turbotrt.export import text_encoder

    encoder = text_encoder.reference_model(text_encoder_name, text_weights)  # fp32: T5 overflows fp16
    tok = Tokenizer(tokenizer_path, text_len=config.text_len)
    return encode_prompts(encoder, tok, qcfg.prompts), list(qcfg.prompts)


# --- calibration -------------------------------------------------------------------------------------

def _runner(model: WanModel, data: CalibrationSet, progress, desc: str) -> Callable[[], None]:
    device = model_device(model)

    def run():
        for s in _iterate(progress, data.samples, desc):
            model.forward_from_sinusoid(*s.inputs(data, model.config.freq_dim, device))
    return run


def smooth(model, state_dict, data, qcfg: QuantConfig, names: list[str], progress) -> tuple[dict, dict]:
    """(smoothed state dict, site -> factors); unchanged when SmoothQuant is off."""
    if qcfg.smoothquant_alpha is None:
        return state_dict, {}
    cfg = model.config
    sites = smooth_sites(cfg.num_layers, cfg.head_dim, set(names))
    watched = sorted({s.consumers[0] for s in sites})  # consumers of one site share one input tensor
    stats = obs.observe_inputs(model, watched, obs.ChannelMaxObserver, _runner(model, data, progress, "smoothquant"))
    factors = {s.name: smoothing_factors(s, stats[s.consumers[0]].amax(), state_dict, qcfg.smoothquant_alpha)
               for s in sites}
    return apply_smoothing(state_dict, sites, factors), factors


def observe_amax(model, data, qcfg: QuantConfig, names: list[str], progress) -> dict[str, float]:
    found = obs.observe_inputs(model, names, lambda: obs.AmaxMethod(qcfg), _runner(model, data, progress, "observe"))
    return obs.activation_amax(found)


def quantize_weights(state_dict: dict, names: list[str], mode: str, tiles: dict | None) -> tuple[dict, dict | None]:
    """Quantized weights, and the tile -> per-channel conversion error when tiles were the source."""
    weights = {n: quantize_weight(state_dict[f"{n}.weight"], mode) for n in names}
    if not tiles:
        return weights, None
    errs = {n: conversion_error(state_dict[f"{n}.weight"].float(), weights[n]) for n in names}
    return weights, dict(
        max_abs=max(e.max_abs for e in errs.values()),
        bound=max(e.bound for e in errs.values()) if mode == "int8" else None,
        within_bound=all(e.within_bound for e in errs.values()) if mode == "int8" else None,
        rel_fro_max=max(e.rel_fro for e in errs.values()),
        rel_fro_mean=sum(e.rel_fro for e in errs.values()) / len(errs),
        per_layer={n: dict(max_abs=e.max_abs, bound=e.bound, rel_fro=e.rel_fro) for n, e in errs.items()},
    )



def calibrate(
    source: str | os.PathLike,
    out: str | os.PathLike,
    mode: str = "int8",
    observer: str | None = None,
    percentile: float = 99.99,
    smoothquant: float | None = None,
    prompts: Sequence[str] | None = None,
    steps: int = 4,
    seeds: Sequence[int] = (0,),
    exclude: Sequence[str] = (),
    embeddings: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    eval_seeds: Sequence[int] | None = None,
    export_options: dict | None = None,
    validate: bool | None = None,
    evaluate: bool = True,
    device: str = "cpu",
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = print,
    progress: Callable | None = None,
) -> QuantReport:
    """Calibrate the DiT of `source` and write the quantized bundle to `out`; returns the report.

    source: an exported float bundle folder (verified unless verify=False), or a tiny preset or a
    checkpoint, exported on the way with `export_options` (every option of `export`: resolution,
    frames, attention, sla_topk, block_q/k, v_dtype, preset, vae, float_precision, ...) into the new
    bundle itself. A `-quant` checkpoint's int8 tiles become the weights (per-channel, with the
    conversion error in the report); `checkpoint` names one for a bundle source. text_encoder and
    tokenizer: the umT5 checkpoint and tokenizer that encode the prompts (a bundle's own are used
    when it has them); embeddings: precomputed prompt embeddings instead. cache: reuse a calibration
    cache made with the same settings instead of observing. eval_seeds: the report's seeds (default:
    one seed past the calibration seeds, so the figures are held out). device: where the PyTorch
    models run (the reference sampler, observers, fake-quant model).
    """
    prompts = None if embeddings is not None else (prompts or QuantConfig.__dataclass_fields__["prompts"].default)
    qcfg = QuantConfig(mode=mode, observer=observer, percentile=percentile, smoothquant_alpha=smoothquant,
                       prompts=tuple(prompts or ()), embeddings_digest=file_digest(embeddings) if embeddings else None,
                       steps=steps, seeds=tuple(seeds), exclude=tuple(exclude))
    export_options = dict(export_options or {})
    path = Path(source)
    bundle, plan = None, None
    if path.is_dir():
        if export_options:
            raise CalibrationError(f"{source} is an exported bundle: its resolution, attention and precision are "
                                   f"fixed; export options ({', '.join(sorted(export_options))}) apply when SOURCE "
                                   "is a checkpoint or preset")
        bundle = Bundle.load(path, verify=verify)
        _check_source_bundle(bundle)
    else:
        if str(source) not in list_configs() and not path.is_file():
            raise CalibrationError(f"{str(source)!r} is neither an exported bundle folder, a preset "
                                   f"({', '.join(list_configs())}) nor a checkpoint file")
        plan = plan_export(str(source), precision=mode, text_encoder_ckpt=text_encoder, tokenizer=tokenizer,
                           **export_options)
        if plan.config.is_i2v:
            raise CalibrationError(f"{plan.config.name} is image-to-video: its calibration needs image conditioning, "
                                   "which is not supported yet")
        weights = plan.networks[0].weights
        if checkpoint is None and getattr(weights, "quantized", False):
            checkpoint = str(source)  # a -quant checkpoint: its own tiles are the weights
        has_text = any(n.network == "text_encoder" for n in plan.networks) and (plan.tiny or plan.tokenizer)
        if embeddings is None and (cache is None or evaluate) and not has_text:
            raise CalibrationError(
                f"calibrating {plan.config.name} needs prompt embeddings: give the umT5 checkpoint and its tokenizer "
                "(--text-encoder, --tokenizer) or precomputed embeddings (--embeddings)")
    names = obs.quantized_linears((bundle.model if bundle else plan.config).num_layers, qcfg.exclude)
    if not names:
        raise CalibrationError(f"exclude patterns {list(qcfg.exclude)} leave no Linear to quantize")
    with BundleWriter(out, force=force, log=log) as writer:
        validation, lints = [], {}
        if bundle is not None:
            src = _copy_source(bundle, writer, validation, lints)
            text_weights = _graph_weights(bundle, "text_encoder") if "text_encoder" in bundle.networks else None
            tok_path = bundle.tokenizer if bundle.manifest.tokenizer else tokenizer
            if text_weights is None and text_encoder is not None:
                from turbotrt.export.text_encoder import checkpoint_weights as t5_weights
                from turbotrt.models.t5 import get_t5_config

                text_weights = t5_weights(text_encoder, get_t5_config(bundle.model.text_encoder))
        else:
            result = ExportResult(writer.out)
            do_validate = validate if validate is not None else (plan.tiny or small(plan.config))
            write_graphs(plan, writer, result, do_validate, export_options.get("seed", 0), log, progress)
            validation = [r.to_dict() for r in result.reports if r.network != NETWORK]
            lints = {n: f for n, f in result.lint.items() if n != NETWORK}
            net = plan.networks[0]
            entry = writer.graphs[NETWORK]
            src = DitSource(plan.config, plan.profile, plan.attention, net.spec.precision, writer.root / entry.file,
                            entry.data, getter(net.weights))
            t5 = next((n for n in plan.networks if n.network == "text_encoder"), None)
            text_weights = t5.weights if t5 else None
            tok_path = writer.root / writer.tokenizer if writer.tokenizer else None
        report = _calibrate(src, writer, qcfg, names, checkpoint, embeddings, text_weights, tok_path, cache,
                            eval_seeds, evaluate, torch.device(device), log, progress)
        lints[NETWORK] = [str(f) for f in lint(writer.file(f"{NETWORK}.onnx"))]
        quantization = Quantization(
            mode=qcfg.mode, float_precision=src.precision, observer=qcfg.observer, config_hash=qcfg.config_hash(),
            networks=(NETWORK,), quantized_linears=tuple(names), cache=CACHE_FILE, report=REPORT_FILE,
            details=dict(
                activations="per-tensor symmetric" + (" int8" if qcfg.mode == "int8" else " fp8 e4m3"),
                weights="per-output-channel symmetric int8" if qcfg.mode == "int8" else "per-tensor fp8 e4m3",
                weight_source="-quant checkpoint tiles" if checkpoint else "float weights",
                smoothquant_alpha=qcfg.smoothquant_alpha),
        )
        report.out = str(writer.out)
        report.save(writer.file(REPORT_FILE))
        writer.commit(src.config, src.profile, src.attention, qcfg.mode, quantization=quantization,
                      validation=validation, lint=lints)
    log(report.format())
    return report


def _check_source_bundle(bundle: Bundle) -> None:
    if bundle.manifest.quantization is not None:
        raise CalibrationError(f"{bundle.root} is already quantized ({bundle.precision}); calibrate the float "
                               "export instead")
    if bundle.model.is_i2v:
        raise CalibrationError(f"{bundle.model.name} is image-to-video: its calibration needs image conditioning, "
                               "which is not supported yet")
    if NETWORK not in bundle.networks:
        raise CalibrationError(f"{bundle.root} has no '{NETWORK}' graph (graphs: {', '.join(bundle.networks)})")


def _graph_weights(bundle: Bundle, network: str) -> GraphWeights:
    data = bundle.data(network)
    return GraphWeights(bundle.graph(network), data.name if data else None)


def _copy_source(bundle: Bundle, writer: BundleWriter, validation: list, lints: dict) -> DitSource:
    """Copy every file of the float bundle but its DiT graph and that graph's engines (built for the
    float graph, they would not match) into the writer's folder: copies, never links."""
    m = bundle.manifest
    entry = m.graphs[NETWORK]
    skip = {entry.file, entry.data} | {e.file for e in m.engines.get(NETWORK, [])}
    skip |= {e.file for es in m.engines.values() for e in es}  # engines are rebuilt for the new bundle
    for rel in m.files:
        if rel not in skip:
            writer.copy_in(bundle.path(rel), rel)
    writer.graphs.update({n: g for n, g in m.graphs.items() if n != NETWORK})
    writer.tokenizer = m.tokenizer
    validation += [v for v in m.validation if v.get("network") != NETWORK]
    lints.update({n: f for n, f in m.lint.items() if n != NETWORK})
    # The quantized graph replaces the float one under the same name (spec unchanged: fp I/O).
    writer.graphs[NETWORK] = entry
    weights = _graph_weights(bundle, NETWORK)
    return DitSource(bundle.model, bundle.profile, bundle.attention, entry.spec.precision, bundle.graph(NETWORK),
                     entry.data, weights)


def _calibrate(src: DitSource, writer: BundleWriter, qcfg: QuantConfig, names: list[str], checkpoint, embeddings,
               text_weights, tokenizer_path, cache, eval_seeds, evaluate, device: torch.device, log,
               progress) -> QuantReport:
    config = src.config
    state_dict = {n: src.weights(n).float() for n in _state_dict_names(config)}
    tiles = None
    if checkpoint is not None:
        tiles = checkpoint_tiles(str(checkpoint), config, names)
        state_dict.update(_dequantized(tiles, state_dict))
    model = dit.reference_model(config, src.attention, state_dict, "fp32", device)
    text = _Lazy(lambda: text_contexts(config, qcfg, embeddings, text_weights, tokenizer_path, config.text_encoder))

    def sample():
        contexts, labels = text()
        log(f"calibration set: {len(contexts)} prompts x seeds {list(qcfg.seeds)} x {qcfg.steps} rCM steps "
            f"at {src.profile.name}")
        return build_calibration_set(model, contexts, src.shape, qcfg.steps, qcfg.seeds, labels=labels,
                                     progress=progress)

    data = _Lazy(sample)  # a cache without evaluation needs no trajectories
    if cache is not None:
        c = load_cache(cache, qcfg, config.name)
        missing = [n for n in names if n not in c.amax]
        if missing:
            raise CalibrationError(f"{cache} has no amax for {missing[:5]}")
        factors = c.smoothing_tensors()
        sites = {s.name: s for s in smooth_sites(config.num_layers, config.head_dim, set(names))}
        unknown = sorted(set(factors) - set(sites))
        if unknown:
            raise CalibrationError(f"{cache} has SmoothQuant factors for {unknown[:5]}, which are not folding sites here")
        smoothed = apply_smoothing(state_dict, [sites[k] for k in factors], factors) if factors else state_dict
        amax = {n: c.amax[n] for n in names}
        log(f"reusing calibration cache {cache} (config {qcfg.config_hash()})")
    else:
        smoothed, factors = smooth(model, state_dict, data(), qcfg, names, progress)
        sq_model = dit.reference_model(config, src.attention, smoothed, "fp32", device) if factors else model
        amax = observe_amax(sq_model, data(), qcfg, names, progress)
    weights, conversion = quantize_weights(smoothed, names, qcfg.mode, tiles)

    graph = writer.file(f"{NETWORK}.onnx")
    overrides = {k: v for k, v in smoothed.items() if v is not state_dict[k] and not _is_quantized_weight(k, names)}
    log(f"inserting {qcfg.mode} Q/DQ for {len(names)} Linears into {graph.name}")
    insert_qdq(src.graph, src.data, graph, weights, amax, qcfg.mode, overrides, progress)
    CalibrationCache(qcfg, config.name, amax, {k: v.tolist() for k, v in factors.items()},
                     src.profile.name).save(writer.file(CACHE_FILE))
    return _report(src, qcfg, names, model, smoothed, weights, amax, factors, conversion, data, text, graph,
                   eval_seeds, evaluate, progress, log)


class _Lazy:
    """A value computed on first use, then kept."""

    def __init__(self, make: Callable):
        self.make, self.done, self.value = make, False, None

    def __call__(self):
        if not self.done:
            self.value, self.done = self.make(), True
        return self.value


def _dequantized(tiles: dict, state_dict: dict) -> dict:
    from turbotrt.models.int8 import dequantize_tiles

    out = {}
    for n, (codes, scale) in tiles.items():
        w = dequantize_tiles(codes, scale)
        ref = state_dict[f"{n}.weight"]
        # The bundle holds the same weights in its float type; a mismatch means another model.
        if w.shape != ref.shape or not torch.allclose(w, ref, rtol=1e-2, atol=1e-2 * float(w.abs().max())):
            raise CalibrationError(f"{n}: the checkpoint's int8 weight does not match the bundle's (another model?)")
        out[f"{n}.weight"] = w
    return out



def _is_quantized_weight(key: str, names: list[str]) -> bool:
    return key.endswith(".weight") and key[: -len(".weight")] in set(names)



def _report(src: "DitSource", qcfg, names, model, smoothed, weights, amax, factors, conversion, data, text, graph,
            eval_seeds, evaluate, progress, log) -> QuantReport:
    config = src.config
    eval_seeds = tuple(eval_seeds) if eval_seeds is not None else (max(qcfg.seeds) + 1,)
    held_out = not set(eval_seeds) & set(qcfg.seeds)
    n_prompts = len(qcfg.prompts) if qcfg.prompts else "embedded"
    report = QuantReport(
        qcfg.mode, qcfg.observer, qcfg.config_hash(), config.name, src.profile.name,
        f"{n_prompts} prompts x seeds {list(eval_seeds)} ({'held-out seeds' if held_out else 'calibration data'})",
        quantized={n: dict(input_amax=amax[n], weight_scale_min=float(weights[n].scale.min()),
                           weight_scale_max=float(weights[n].scale.max()),
                           smoothed=any(n in s for s in _site_consumers(config, names, factors))) for n in names},
        skipped=obs.skipped_linears(model, names, qcfg.exclude),
        smoothquant=dict(alpha=qcfg.smoothquant_alpha, folded=sorted(factors),
                         skipped=skipped_sites(names) if qcfg.smoothquant_alpha is not None else {}),
        weight_conversion=conversion,
    )
    if conversion is not None:
        report.notes.append("the float reference uses the -quant checkpoint's dequantized tiles (TurboDiffusion's "
                            "weights) with float activations; the figures measure what per-channel Q/DQ adds to that")
    if not evaluate:
        report.notes.append("quality not evaluated (evaluate=False)")
        return report
    if src.attention.sparse:
        report.notes.append("SLA keeps the top-k key blocks of each query block; quantizing q/k can change that "
                            "selection ('SLA rows changed'), which swaps whole key blocks and dominates the error "
                            "of the samples where it happens")
    if tuple(eval_seeds) == qcfg.seeds:
        eval_data = data()
    else:
        contexts, labels = text()
        eval_data = build_calibration_set(model, contexts, src.shape, qcfg.steps, eval_seeds, labels=labels,
                                          progress=progress)
    fq = fake_quant_model(dit.reference_model(config, src.attention, smoothed, "fp32", model_device(model)), weights,
                          amax, qcfg.mode)
    backends = [("pytorch-fakequant", fq)]
    if src.precision != "bf16":
        backends.insert(0, ("onnxruntime", OrtDit(graph, config)))
        if src.precision == "fp16":
            report.notes.append("fp16 graph in ONNX Runtime vs an fp32 fake-quant model: the gap includes fp16 rounding")
    else:
        report.notes.append("ONNX Runtime's CPU provider has no bf16 kernels for this graph; only the fake-quant "
                            "PyTorch model (fp32) was evaluated")
    for name, m in backends:
        log(f"evaluating {name}")
        report.per_step += step_quality(name, m, eval_data, config.freq_dim, reference=model)
        report.final_latent.append(final_quality(name, m, eval_data))
    return report


def _site_consumers(config, names, factors) -> list[tuple[str, ...]]:
    return [s.consumers for s in smooth_sites(config.num_layers, config.head_dim, set(names)) if s.name in factors]




def _site_consumers(config, names, factors) -> list[tuple[str, ...]]:
    return [s.consumers for s in smooth_sites(config.num_layers, config.head_dim, set(names)) if s.name in factors]
