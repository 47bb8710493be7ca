"""`export()`: a checkpoint (or a built-in tiny preset) -> a bundle of validated ONNX graphs.

Everything that can be checked is checked before any work (source, preset, profile, attention,
precision, every checkpoint's keys and shapes, the output folder). The bundle is then written
through `BundleWriter` (a partial folder committed whole), one network definition at a time:
export, TensorRT lint, ONNX Runtime vs PyTorch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from turbotrt.core.bundle import Bundle, BundleWriter
from turbotrt.core.configs import AttentionConfig, WanConfig, get_config, list_configs, shape_profile
from turbotrt.core.errors import TurbotrtError
from turbotrt.core.precision import FLOAT_PRECISIONS, PRECISIONS, Precision, text_encoder_precision
from turbotrt.export import dit, text_encoder, vae
from turbotrt.export.lint import lint
from turbotrt.export.networks import NetworkExport, export_graph
from turbotrt.export.validate import ValidationReport, validate_onnx
from turbotrt.models.wan import WanModel

# Validating in ONNX Runtime means running the PyTorch reference too; past this many DiT parameters
# on a CPU that takes longer than the export itself, so it is opt-in (--validate).
AUTO_VALIDATE_MAX_PARAMS = 50_000_000


class ExportError(TurbotrtError):
    pass


@dataclass
class ExportResult:
    out: Path
    bundle: Bundle | None = None
    graphs: dict[str, str] = field(default_factory=dict)  # network -> file name
    reports: list[ValidationReport] = field(default_factory=list)
    lint: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed or r.skipped for r in self.reports)


def resolve_source(source: str, preset: str | None) -> tuple[WanConfig, str | None]:
    """(config, checkpoint path or None) from a preset name or a checkpoint file."""
    if source in list_configs():
        config = get_config(source)
        if not config.name.startswith("wan-tiny"):
            raise ExportError(f"{source} is a full-size preset: give its checkpoint file (or write random weights "
                              f"with `turbotrt random-checkpoint --preset {source} FILE` to try the export)")
        if preset is not None and preset != source:
            raise ExportError(f"--preset {preset} contradicts the source preset {source}")
        return config, None
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{source!r} is neither a preset ({', '.join(list_configs())}) nor an existing checkpoint")
    from turbotrt.models.checkpoint import detect_wan_preset, normalize_wan_state_dict, read_state_dict

    if preset is not None:
        return get_config(preset), str(path)
    name = detect_wan_preset(normalize_wan_state_dict(read_state_dict(path)))
    if name is None:
        raise ExportError(f"{source}: no preset matches its shapes; name one with --preset")
    return get_config(name), str(path)


def small(config: WanConfig) -> bool:
    """Few enough parameters that a PyTorch reference forward on a CPU is quick."""
    with torch.device("meta"):
        n = sum(p.numel() for p in WanModel(config).parameters())
    return n <= AUTO_VALIDATE_MAX_PARAMS


@dataclass
class ExportPlan:
    """Everything `export` will do, resolved and checked before any file is written."""

    config: WanConfig
    profile: object
    attention: AttentionConfig
    precision: Precision
    networks: list[NetworkExport]
    tokenizer: str | None  # a file to copy in; None: none, or the tiny one is made
    tiny: bool
    skipped: list[str] = field(default_factory=list)  # what the bundle will lack, and why


def plan_export(source: str, resolution: str | None = None, frames: int | None = None, aspect: str = "16:9",
                precision: str = "bf16", attention: str = "sagesla", sla_topk: float | None = None,
                block_q: int | None = None, block_k: int | None = None, v_dtype: str = "fp8",
                preset: str | None = None, low_noise: str | None = None, text_encoder_ckpt: str | None = None,
                vae_ckpt: str | None = None, tokenizer: str | None = None, seed: int = 0,
                float_precision: str | None = None) -> ExportPlan:
    """Resolve and check every option and checkpoint; raise ExportError (or a CheckpointError naming
    the bad keys) before anything is written."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    prec = Precision(precision, float_precision or "fp32")
    if float_precision is not None and prec.quant is None and float_precision != precision:
        raise ExportError(f"--float-precision applies to int8/fp8 bundles; a {precision} bundle is {precision} "
                          "throughout")
    config, ckpt = resolve_source(source, preset)
    try:
        profile = shape_profile(resolution or config.default_resolution,
                                config.default_frames if frames is None else frames, aspect, config)
        att = AttentionConfig.for_model(config, attention, topk=sla_topk, block_q=block_q, block_k=block_k,
                                        v_dtype=v_dtype)
    except ValueError as e:
        raise ExportError(str(e)) from None
    tiny = ckpt is None
    if tiny and any(x is not None for x in (low_noise, text_encoder_ckpt, vae_ckpt, tokenizer)):
        raise ExportError(f"{config.name} is a built-in tiny preset with its own seeded weights and tokenizer: "
                          "--low-noise, --text-encoder, --vae and --tokenizer take the files of a real checkpoint")
    if config.experts and not tiny and low_noise is None:
        raise ExportError(f"{config.name} has two experts: pass the low-noise checkpoint with --low-noise")
    if low_noise is not None and not config.experts:
        raise ExportError(f"--low-noise is for two-expert models (wan2.2-i2v-a14b); {config.name} has one DiT")
    graph_precision = prec.float_precision
    skipped = []
    try:
        # DiT: one graph per expert; the tiny experts are seeded seed, seed+1 like the reference pipeline's.
        names = dit.network_names(config)
        if tiny:
            weights = {n: dit.random_weights(config, seed + i) for i, n in enumerate(names)}
        else:
            weights = {n: dit.checkpoint_weights(p, config) for n, p in zip(names, [ckpt, low_noise])}
            if prec.quant is None and any(getattr(w, "quantized", False) for w in weights.values()):
                raise ExportError(
                    f"{ckpt} is a W8A8 -quant checkpoint: exporting it as {precision} would silently dequantize "
                    "its int8 weights; export it with --precision int8 (its tiles become per-channel INT8 "
                    "weights) or export the float checkpoint")
        networks = dit.definitions(config, profile, att, graph_precision, weights)
        # umT5 overflows fp16: an fp16 bundle keeps its text encoder in fp32.
        from turbotrt.models.t5 import get_t5_config, random_t5_state_dict
        from turbotrt.models.vae import get_vae_config, random_vae_state_dict

        t5_cfg = get_t5_config(config.text_encoder)
        if tiny or text_encoder_ckpt:
            w = random_t5_state_dict(t5_cfg, seed) if tiny else text_encoder.checkpoint_weights(text_encoder_ckpt, t5_cfg)
            networks.append(text_encoder.definition(t5_cfg, text_encoder_precision(graph_precision), w))
        else:
            skipped.append("text_encoder: pass the umT5 checkpoint (--text-encoder) to include it")
        vae_cfg = get_vae_config(config.vae)
        if tiny or vae_ckpt:
            w = random_vae_state_dict(vae_cfg, seed) if tiny else vae.checkpoint_weights(vae_ckpt, vae_cfg)
            kinds = vae.VAE_NETWORKS if config.is_i2v else vae.DECODE_NETWORKS
            networks += vae.definitions(vae_cfg, profile, graph_precision, w, kinds)
        else:
            skipped.append("vae: pass the Wan VAE checkpoint (--vae) to include it")
    except ValueError as e:
        if isinstance(e, TurbotrtError):
            raise
        raise ExportError(str(e)) from None
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ExportError(f"tokenizer file not found: {tokenizer}")
    if not tiny and tokenizer is None:
        skipped.append("tokenizer: pass the umT5 sentencepiece model (--tokenizer) to include it")
    return ExportPlan(config, profile, att, prec, networks, tokenizer, tiny, skipped)


def export(
    source: str,
    out: str | os.PathLike,
    resolution: str | None = None,
    frames: int | None = None,
    aspect: str = "16:9",
    precision: str = "fp32",
    attention: str = "sla",
    sla_topk: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    v_dtype: str = "fp8",
    preset: str | None = None,
    low_noise: str | None = None,
    text_encoder: str | None = None,
    vae: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    validate: bool | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable | None = None,
) -> ExportResult:
    """Export a bundle to `out`: the DiT (each I2V expert), umT5, the VAE step graphs, the tokenizer
    and `manifest.json`, each graph validated in ONNX Runtime against PyTorch.

    source: a tiny preset name (seeded random weights for every network, a generated tokenizer) or
    a DiT checkpoint; I2V A14B takes the high-noise checkpoint as source and the low-noise one as
    `low_noise`. With a checkpoint, text_encoder/vae/tokenizer are their files; a network whose
    file is not given is left out (the log says so) and the bundle cannot `run` until it is.
    Float precisions only: int8/fp8 bundles come from `turbotrt.calibration.calibrate`.
    """
    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if precision not in FLOAT_PRECISIONS:
        raise ExportError(f"export() writes float bundles ({', '.join(FLOAT_PRECISIONS)}); for {precision} use "
                          "turbotrt.calibration.calibrate (or `turbotrt export --precision int8`)")
    plan = plan_export(source, resolution, frames, aspect, precision, attention, sla_topk, block_q, block_k, v_dtype,
                       preset, low_noise, text_encoder, vae, tokenizer, seed)
    do_validate = validate if validate is not None else (plan.tiny or small(plan.config))
    result = ExportResult(Path(out))
    with BundleWriter(out, force=force, log=log) as writer:
        write_graphs(plan, writer, result, do_validate, seed, log, progress)
        result.bundle = writer.commit(plan.config, plan.profile, plan.attention, precision,
                                      validation=[r.to_dict() for r in result.reports], lint=result.lint)
    result.seconds = time.perf_counter() - start
    return result


def write_graphs(plan: ExportPlan, writer: BundleWriter, result: ExportResult, do_validate: bool, seed: int,
                 log: Callable[[str], None], progress=None) -> None:
    """Export, lint and validate every network of `plan` into the writer's folder, then the tokenizer."""
    for line in plan.skipped:
        log(f"[{line.split(':')[0]}] skipped:{line.split(':', 1)[1]}")
    for net in plan.networks:
        log(f"[{net.network}] tracing {net.summary}")
        path = export_graph(net, writer.file(f"{net.network}.onnx"), progress)
        writer.add_graph(net.spec, path.name)
        result.graphs[net.network] = path.name
        findings = lint(path)
        result.lint[net.network] = [str(f) for f in findings]
        errors = [f for f in findings if f.severity == "error"]
        log(f"[{net.network}] wrote {path.name} (+ .data); TensorRT lint: {len(errors)} errors, "
            f"{len(findings) - len(errors)} warnings")
        if do_validate:
            report = validate_onnx(path, net.spec, net.reference(), net.feeds(seed))
            result.reports.append(report)
            log(report.format())
        elif net.family == "dit":
            log(f"[{net.network}] validation skipped (a {plan.config.name} reference forward on a CPU is slow; "
                f"pass --validate to run it)")
    if plan.tiny:
        from turbotrt.core.tokenizer import make_tiny_tokenizer

        model = make_tiny_tokenizer(writer.file("tokenizer/spiece.model").parent, seed=seed)
        writer.tokenizer = model.relative_to(writer.root).as_posix()
    elif plan.tokenizer:
        src = Path(plan.tokenizer)
        rel = "tokenizer/tokenizer.json" if src.suffix == ".json" else "tokenizer/spiece.model"
        writer.copy_in(src, rel)
        writer.tokenizer = rel
