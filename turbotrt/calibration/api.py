"""`calibrate()`: an exported float DiT bundle (or a preset / checkpoint, exported first) -> a bundle
whose DiT graph carries explicit INT8 or FP8 Q/DQ, with its calibration cache and quality report.

Steps: the float reference samples real rCM trajectories (the calibration set); SmoothQuant, when
asked, measures per-channel maxima and folds its factors where that is exact; observers measure
every block Linear's input; weights are quantized per output channel (INT8) or per tensor (FP8),
from a `-quant` checkpoint's int8 tiles when given; Q/DQ goes into the graph; ONNX Runtime and the
fake-quant PyTorch model are compared with the float model per step and over the whole loop.
The output folder is written as `<out>.partial` and renamed only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from turbotrt.bundle import MANIFEST
from turbotrt.calibration import observers as obs
from turbotrt.calibration.cache import CalibrationCache, load_cache
from turbotrt.calibration.config import QuantConfig, file_digest
from turbotrt.calibration.dataset import (
    CalibrationSet,
    build_calibration_set,
    encode_prompts,
    load_embeddings,
    load_text_encoder,
    model_device,
    tiny_text_encoder,
)
from turbotrt.calibration.graph_io import float_state_dict
from turbotrt.calibration.qdq import insert_qdq
from turbotrt.calibration.quantize import conversion_error, fake_quant_model, quantize_weight
from turbotrt.calibration.report import OrtDit, QuantReport, final_quality, step_quality
from turbotrt.calibration.smoothquant import apply_smoothing, skipped_sites, smooth_sites, smoothing_factors
from turbotrt.models.attention import AttentionConfig
from turbotrt.models.configs import WanConfig, get_config, list_configs
from turbotrt.models.wan import WanModel

CACHE_FILE = "calibration_cache.json"
REPORT_FILE = "quant_report.json"


class CalibrationError(RuntimeError):
    pass


@dataclass
class SourceBundle:
    """An exported float DiT: its folder, manifest and what the manifest says about the model."""

    path: Path
    manifest: dict
    config: WanConfig
    attention: AttentionConfig
    network: str

    @property
    def graph(self) -> Path:
        return self.path / self.manifest["graphs"][self.network]["file"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["graphs"][self.network]["spec"]["inputs"][0]["shape"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def profile(self) -> str:
        return self.manifest["profile"]["name"]


def open_bundle(path: str | os.PathLike) -> SourceBundle:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CalibrationError(f"{path} is not an exported bundle (no {MANIFEST}); export it first")
    manifest = json.loads(mf.read_text())
    if manifest.get("quantization"):
        raise CalibrationError(f"{path} is already quantized ({manifest['quantization'].get('mode')}); "
                               "calibrate the float export instead")
    config = get_config(manifest["model"]["name"])
    if config.is_i2v:
        raise CalibrationError(f"{config.name} is image-to-video: its calibration needs image conditioning, "
                               "which is not supported yet")
    graphs = manifest.get("graphs", {})
    if "dit" not in graphs:
        raise CalibrationError(f"{path}: the manifest lists no 'dit' graph (graphs: {sorted(graphs)})")
    return SourceBundle(path, manifest, config, AttentionConfig(**manifest["attention"]), "dit")


def _iterate(progress, items, desc: str):
    return progress(items, desc=desc) if progress else items


# --- inputs ------------------------------------------------------------------------------------------

def resolve_source(source: str, workdir: Path, attention: str, precision: str, seed: int, log) -> tuple[SourceBundle, str | None]:
    """(float bundle, -quant checkpoint or None) from a bundle folder, a tiny preset or a checkpoint."""
    path = Path(source)
    if path.is_dir():
        return open_bundle(path), None
    if source not in list_configs() and not path.is_file():
        raise CalibrationError(f"{source!r} is neither an exported bundle folder, a preset "
                               f"({', '.join(list_configs())}) nor a checkpoint file")
    from turbotrt.export.api import export

    log(f"exporting the float graph of {source} first")
    export(source, workdir / "float", precision=precision, attention=attention, seed=seed, validate=False, log=log)
    quant_ckpt = None
    if path.is_file():
        from turbotrt.models.checkpoint import is_quantized, read_state_dict

        quant_ckpt = source if is_quantized(read_state_dict(path)) else None
    return open_bundle(workdir / "float"), quant_ckpt


def checkpoint_tiles(path: str, config: WanConfig, names: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


def text_contexts(config: WanConfig, qcfg: QuantConfig, embeddings, text_encoder, tokenizer, workdir: Path):
    """(contexts, labels) for the config's prompts, or the rows of an embeddings file."""
    if embeddings is not None:
        ctx = load_embeddings(embeddings, config)
        return ctx, [f"{Path(embeddings).name}[{i}]" for i in range(len(ctx))]
    if text_encoder is not None:
        if tokenizer is None:
            raise CalibrationError("a text encoder checkpoint needs its tokenizer (--tokenizer, or a bundle "
                                   "that carries one)")
        encoder, tok = load_text_encoder(text_encoder, tokenizer, config)
    elif config.name.startswith("wan-tiny"):
        encoder, tok = tiny_text_encoder(config, workdir)
    else:
        raise CalibrationError(f"{config.name}: give the umT5 checkpoint and tokenizer (text_encoder=, tokenizer=) "
                               "to encode prompts, or precomputed embeddings (embeddings=)")
    return encode_prompts(encoder, tok, qcfg.prompts), list(qcfg.prompts)


def reference_model(bundle: SourceBundle, state_dict: dict, device="cpu") -> WanModel:
    """The fp32 PyTorch model of what ONNX Runtime runs (SageSLA's function body is the exact `sla` core)."""
    att = bundle.attention
    ref_att = AttentionConfig(**{**att.to_dict(), "mode": "sla" if att.mode == "sagesla" else att.mode})
    with torch.device("meta"):
        model = WanModel(bundle.config, ref_att)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.float().to(device).eval().requires_grad_(False)


def _state_dict_names(config: WanConfig) -> list[str]:
    with torch.device("meta"):
        return list(WanModel(config).state_dict())


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
    attention: str = "sla",
    precision: str = "fp32",
    evaluate: bool = True,
    device: str = "cpu",
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable | None = None,
) -> QuantReport:
    """Calibrate the DiT of `source` and write the quantized bundle to `out`; returns the report.

    source: an exported bundle folder, a tiny preset, or a checkpoint (exported first with
    `attention` and `precision`). checkpoint: a `-quant` checkpoint whose int8 tiles become the
    weights (a `-quant` source is used that way by itself). cache: reuse a calibration cache made
    with the same settings instead of observing. eval_seeds: the report's seeds (default: one seed
    past the calibration seeds, so the figures are held out). device: where the PyTorch models run
    (the reference sampler, observers, fake-quant model); data stays on the CPU between uses.
    """
    prompts = None if embeddings is not None else (prompts or QuantConfig.__dataclass_fields__["prompts"].default)
    qcfg = QuantConfig(mode=mode, observer=observer, percentile=percentile, smoothquant_alpha=smoothquant,
                       prompts=tuple(prompts or ()), embeddings_digest=file_digest(embeddings) if embeddings else None,
                       steps=steps, seeds=tuple(seeds), exclude=tuple(exclude))
    out = Path(out)
    if out.exists() and not force:
        raise CalibrationError(f"{out} exists; pass force=True (--force) to replace it")
    with tempfile.TemporaryDirectory(prefix="turbotrt-calib-") as tmp:
        tmp = Path(tmp)
        bundle, quant_ckpt = resolve_source(str(source), tmp, attention, precision, 0, log)
        report = _calibrate_bundle(bundle, out, qcfg, checkpoint or quant_ckpt, embeddings, text_encoder, tokenizer,
                                   cache, eval_seeds, evaluate, torch.device(device), tmp, log, progress)
    return report


def _calibrate_bundle(bundle: SourceBundle, out: Path, qcfg: QuantConfig, checkpoint, embeddings, text_encoder, tokenizer,
                      cache, eval_seeds, evaluate, device: torch.device, tmp: Path, log, progress) -> QuantReport:
    config = bundle.config
    names = obs.quantized_linears(config.num_layers, qcfg.exclude)
    if not names:
        raise CalibrationError(f"exclude patterns {list(qcfg.exclude)} leave no Linear to quantize")
    state_dict = float_state_dict(bundle.graph, _state_dict_names(config))
    tiles = None
    if checkpoint is not None:
        tiles = checkpoint_tiles(str(checkpoint), config, names)
        state_dict.update(_dequantized(tiles, state_dict))
    model = reference_model(bundle, state_dict, device)

    if tokenizer is None and bundle.manifest.get("tokenizer"):
        tokenizer = bundle.path / bundle.manifest["tokenizer"]
    text = _Lazy(lambda: text_contexts(config, qcfg, embeddings, text_encoder, tokenizer, tmp))

    def sample():
        contexts, labels = text()
        log(f"calibration set: {len(contexts)} prompts x seeds {list(qcfg.seeds)} x {qcfg.steps} rCM steps "
            f"at {bundle.profile}")
        return build_calibration_set(model, contexts, bundle.shape, qcfg.steps, qcfg.seeds, labels=labels,
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
        sq_model = reference_model(bundle, smoothed, device) if factors else model
        amax = observe_amax(sq_model, data(), qcfg, names, progress)
    weights, conversion = quantize_weights(smoothed, names, qcfg.mode, tiles)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        graph = partial / bundle.graph.name
        overrides = {k: v for k, v in smoothed.items() if v is not state_dict[k] and not _is_quantized_weight(k, names)}
        log(f"inserting {qcfg.mode} Q/DQ for {len(names)} Linears into {graph.name}")
        insert_qdq(bundle.graph, graph, weights, amax, qcfg.mode, overrides, progress)
        cal = CalibrationCache(qcfg, config.name, amax, {k: v.tolist() for k, v in factors.items()}, bundle.profile)
        cal.save(partial / CACHE_FILE)
        report = _report(bundle, qcfg, names, model, smoothed, weights, amax, factors, conversion, data, text, graph,
                         eval_seeds, evaluate, progress, log)
        report.out = str(out)
        report.save(partial / REPORT_FILE)
        _copy_other_files(bundle, partial)
        _write_manifest(bundle, partial, qcfg, names, graph)
        old = out.with_name(out.name + ".old")
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(report.format())
    return report


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


def _report(bundle, qcfg, names, model, smoothed, weights, amax, factors, conversion, data, text, graph,
            eval_seeds, evaluate, progress, log) -> QuantReport:
    config = bundle.config
    eval_seeds = tuple(eval_seeds) if eval_seeds is not None else (max(qcfg.seeds) + 1,)
    held_out = not set(eval_seeds) & set(qcfg.seeds)
    n_prompts = len(qcfg.prompts) if qcfg.prompts else "embedded"
    report = QuantReport(
        qcfg.mode, qcfg.observer, qcfg.config_hash(), config.name, bundle.profile,
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
    if bundle.attention.mode != "dense":
        report.notes.append("SLA keeps the top-k key blocks of each query block; quantizing q/k can change that "
                            "selection ('SLA rows changed'), which swaps whole key blocks and dominates the error "
                            "of the samples where it happens")
    if tuple(eval_seeds) == qcfg.seeds:
        eval_data = data()
    else:
        contexts, labels = text()
        eval_data = build_calibration_set(model, contexts, bundle.shape, qcfg.steps, eval_seeds, labels=labels,
                                          progress=progress)
    fq = fake_quant_model(reference_model(bundle, smoothed, model_device(model)), weights, amax, qcfg.mode)
    backends = [("pytorch-fakequant", fq)]
    if bundle.precision != "bf16":
        backends.insert(0, ("onnxruntime", OrtDit(graph, config)))
        if bundle.precision == "fp16":
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


def _copy_other_files(bundle: SourceBundle, folder: Path) -> None:
    """Every file of the float bundle but its DiT graph and the DiT's engines (built for the float
    graph, they would not match); hard links where the file system allows, else copies."""
    graph = bundle.manifest["graphs"][bundle.network]
    skip = {graph["file"], graph["data"]}
    skip |= {e["file"] for e in bundle.manifest.get("engines", {}).get(bundle.network, [])}
    for rel in bundle.manifest.get("files", {}):
        if rel in skip:
            continue
        src, dst = bundle.path / rel, folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _write_manifest(bundle: SourceBundle, folder: Path, qcfg: QuantConfig, names: list[str], graph: Path) -> None:
    from turbotrt.bundle import file_hashes, write_manifest
    from turbotrt.export.lint import lint

    network = bundle.network
    manifest = dict(bundle.manifest)
    manifest["engines"] = {n: e for n, e in manifest.get("engines", {}).items() if n != network}
    # The float graph's validation does not describe this one: the quality report does.
    manifest["validation"] = [v for v in manifest.get("validation", []) if v.get("network") != network]
    manifest["lint"] = {**manifest.get("lint", {}), network: [str(f) for f in lint(graph)]}
    manifest["quantization"] = dict(
        mode=qcfg.mode, observer=qcfg.observer, config_hash=qcfg.config_hash(),
        activations="per-tensor symmetric" + (" int8" if qcfg.mode == "int8" else " fp8 e4m3"),
        weights="per-output-channel symmetric int8" if qcfg.mode == "int8" else "per-tensor fp8 e4m3",
        smoothquant_alpha=qcfg.smoothquant_alpha, quantized_linears=names,
        cache=CACHE_FILE, report=REPORT_FILE,
    )
    manifest["files"] = file_hashes(folder)
    write_manifest(folder, manifest)
