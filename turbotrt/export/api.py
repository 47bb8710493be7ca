"""`export()`: a checkpoint (or a built-in tiny preset) -> a folder of validated ONNX graphs.

The folder is written as `<out>.partial` and renamed to `<out>` only when every graph and the
manifest are complete, so an interrupted export never leaves a folder that looks whole.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from turbotrt.bundle import MANIFEST, SCHEMA_VERSION, file_hashes, write_manifest
from turbotrt.export.configs import ExportSpec, check_precision, dit_spec
from turbotrt.export.dit import checkpoint_weights, export_dit, random_weights
from turbotrt.export.lint import lint
from turbotrt.export.validate import ValidationReport, random_feeds, validate_onnx
from turbotrt.models.attention import ATTENTION_MODES, AttentionConfig
from turbotrt.models.configs import WanConfig, get_config, list_configs, shape_profile
from turbotrt.models.wan import WanModel
from turbotrt.plugins.sagesla import contract
from turbotrt.runtime.rcm import timestep_sinusoid

# Validating in ONNX Runtime means running the PyTorch reference too; past this many DiT parameters
# on a CPU that takes longer than the export itself, so it is opt-in (--validate).
AUTO_VALIDATE_MAX_PARAMS = 50_000_000


class ExportError(RuntimeError):
    pass


@dataclass
class ExportResult:
    out: Path
    graphs: dict[str, str] = field(default_factory=dict)  # network -> file name
    specs: dict[str, ExportSpec] = field(default_factory=dict)
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
        return config, None
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{source!r} is neither a preset ({', '.join(list_configs())}) nor an existing checkpoint")
    from turbotrt.models.checkpoint import detect_wan_preset, normalize_wan_state_dict, read_state_dict

    name = preset or detect_wan_preset(normalize_wan_state_dict(read_state_dict(path)))
    if name is None:
        raise ExportError(f"{source}: no preset matches its shapes; name one with --preset")
    return get_config(name), str(path)


def _dit_reference(config: WanConfig, attention: AttentionConfig, weights, precision: str) -> Callable:
    """PyTorch reference of what ONNX Runtime runs: the SageSLA function body is the exact-softmax
    sparse core, so a sagesla export is compared with the `sla` model of the same geometry."""
    ref_att = AttentionConfig(**{**attention.to_dict(), "mode": "sla" if attention.mode == "sagesla" else attention.mode})
    model = WanModel(config, ref_att)
    sd = weights if isinstance(weights, dict) else {k: weights(k) for k in model.state_dict()}
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model.to(dtype).eval()

    @torch.no_grad()
    def run(feeds):
        args = [torch.from_numpy(feeds[n]) for n in ("x", "t_freq", "context", "y") if n in feeds]
        return {"velocity": model.forward_from_sinusoid(*args).float().numpy()}

    return run


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
    file is not given is left out (the manifest says so) and the bundle cannot `run` until it is.
    """
    start = time.perf_counter()
    check_precision(precision)
    if attention not in ATTENTION_MODES:
        raise ExportError(f"unknown attention {attention!r}; available: {', '.join(ATTENTION_MODES)}")
    config, ckpt = resolve_source(source, preset)
    profile = shape_profile(resolution or config.default_resolution, frames or config.default_frames, aspect, config)
    att = AttentionConfig.for_model(config, attention, topk=sla_topk, block_q=block_q, block_k=block_k, v_dtype=v_dtype)
    if att.mode == "sagesla" and config.head_dim not in contract.QUANT_HEAD_DIMS:
        raise ExportError(f"sagesla supports head_dim {contract.QUANT_HEAD_DIMS}; {config.name} has {config.head_dim}")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    experts = config.experts or ("",)
    if config.experts and ckpt is not None and low_noise is None:
        raise ExportError(f"{config.name} has two experts: pass the low-noise checkpoint with --low-noise")
    result = ExportResult(out)
    try:
        for i, expert in enumerate(experts):
            network = f"dit_{expert}" if expert else "dit"
            spec = dit_spec(config, profile, precision, network)
            if ckpt is None:
                weights = random_weights(config, seed + i)  # the reference pipeline's tiny experts: seed, seed+1
            else:
                weights = checkpoint_weights(ckpt if i == 0 else low_noise, config)
            log(f"[{network}] tracing {config.name} at {profile.name} ({spec.extra['seq_len']} tokens), "
                f"{precision}, attention {att.mode} {att.block_q}/{att.block_k} topk {att.topk}")
            path = export_dit(config, spec, att, partial / f"{network}.onnx", weights, progress)
            result.graphs[network] = path.name
            result.specs[network] = spec
            do_validate = validate if validate is not None else _small(config)
            feeds = random_feeds(spec, seed)
            feeds["t_freq"] = timestep_sinusoid([988.0] * spec.inputs[1].shape[0], config.freq_dim)
            _validate_and_lint(path, spec, lambda: _dit_reference(config, att, weights, precision), feeds,
                               do_validate, result, log)
            if not do_validate:
                log(f"[{network}] validation skipped (a {config.name} reference forward on a CPU is slow; "
                    f"pass --validate to run it)")
        _export_text_and_vae(config, profile, precision, ckpt, text_encoder, vae, tokenizer, seed, validate,
                             partial, result, log, progress)
        manifest = _manifest(config, profile, att, precision, result, experts)
        log("hashing the bundle's files (sha256)")
        manifest["files"] = file_hashes(partial)
        write_manifest(partial, manifest)
        old = out.with_name(out.name + ".old")
        if out.exists():  # --force: keep the old folder until the new one is in place
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _validate_and_lint(path, spec, reference, feeds, validate, result, log) -> None:
    findings = lint(path)
    result.lint[spec.network] = [str(f) for f in findings]
    errors = [f for f in findings if f.severity == "error"]
    log(f"[{spec.network}] wrote {path.name} (+ .data); TensorRT lint: {len(errors)} errors, "
        f"{len(findings) - len(errors)} warnings")
    if validate:
        report = validate_onnx(path, spec, reference(), feeds)
        result.reports.append(report)
        log(report.format())


def _export_text_and_vae(config, profile, precision, ckpt, t5_path, vae_path, tok_path, seed, validate,
                         out_dir: Path, result: ExportResult, log, progress) -> None:
    from turbotrt.export import text_encoder as te
    from turbotrt.export import vae as ve
    from turbotrt.models.t5 import get_t5_config, random_t5_state_dict
    from turbotrt.models.tokenizer import make_tiny_tokenizer
    from turbotrt.models.vae import get_vae_config, random_vae_state_dict

    tiny = ckpt is None
    do_validate = validate if validate is not None else tiny
    # umT5 overflows fp16: an fp16 bundle keeps its text encoder in fp32 (bf16 bundles use bf16).
    t5_precision = "bf16" if precision == "bf16" else "fp32"
    t5_cfg = get_t5_config(config.text_encoder)
    if tiny or t5_path:
        weights = random_t5_state_dict(t5_cfg, seed) if tiny else te.t5_checkpoint_weights(t5_path, t5_cfg)
        spec = te.t5_spec(t5_cfg, t5_precision)
        log(f"[text_encoder] {t5_cfg.name}, {t5_precision}")
        path = te.export_text_encoder(t5_cfg, spec, out_dir / "text_encoder.onnx", weights, progress)
        result.graphs["text_encoder"] = path.name
        result.specs["text_encoder"] = spec
        _validate_and_lint(path, spec, lambda: te.t5_reference(t5_cfg, weights, t5_precision),
                           te.t5_feeds(spec, seed=seed), do_validate, result, log)
    else:
        log("[text_encoder] skipped: pass the umT5 checkpoint (--text-encoder) to include it")
    vae_cfg = get_vae_config(config.vae)
    if tiny or vae_path:
        weights = random_vae_state_dict(vae_cfg, seed) if tiny else ve.vae_checkpoint_weights(vae_path, vae_cfg)
        networks = ve.VAE_NETWORKS if config.is_i2v else ve.DECODE_NETWORKS
        for network, spec in ve.vae_specs(vae_cfg, profile, precision, networks).items():
            log(f"[{network}] {vae_cfg.name}, {precision}")
            path = ve.export_vae_graph(vae_cfg, spec, out_dir / f"{network}.onnx", weights, progress)
            result.graphs[network] = path.name
            result.specs[network] = spec
            _validate_and_lint(path, spec, lambda spec=spec: ve.vae_reference(vae_cfg, spec, weights),
                               random_feeds(spec, seed), do_validate, result, log)
    else:
        log("[vae] skipped: pass the Wan VAE checkpoint (--vae) to include it")
    tok_dir = out_dir / "tokenizer"
    if tiny:
        make_tiny_tokenizer(tok_dir, seed=seed)
    elif tok_path:
        src = Path(tok_path)
        if not src.is_file():
            raise ExportError(f"tokenizer file not found: {src}")
        tok_dir.mkdir()
        shutil.copyfile(src, tok_dir / src.name)
    else:
        log("[tokenizer] skipped: pass the umT5 sentencepiece model (--tokenizer) to include it")


def _tokenizer_file(folder: Path) -> str | None:
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    return f"tokenizer/{files[0].name}" if files else None


def _small(config: WanConfig) -> bool:
    with torch.device("meta"):
        n = sum(p.numel() for p in WanModel(config).parameters())
    return n <= AUTO_VALIDATE_MAX_PARAMS


def _manifest(config, profile, att, precision, result: ExportResult, experts) -> dict:
    from turbotrt.runtime.rcm import net_timesteps, rcm_times

    specs = {n: spec.to_dict() for n, spec in result.specs.items()}
    return dict(
        schema_version=SCHEMA_VERSION,
        model=config.to_dict(),
        profile=profile.to_dict(),
        attention=att.to_dict(),
        sagesla_op=dict(domain=contract.DOMAIN, op_type=contract.OP_TYPE, plugin=contract.PLUGIN_NAME,
                        plugin_version=contract.PLUGIN_VERSION) if att.mode != "dense" else None,
        precision=precision,
        sampler=dict(sigma_max=config.sigma_max, boundary=config.boundary, experts=list(experts),
                     net_timesteps={s: net_timesteps(rcm_times(s, config.sigma_max)).tolist() for s in range(1, 5)}),
        graphs={n: dict(file=f, data=f + ".data", spec=specs[n]) for n, f in result.graphs.items()},
        tokenizer=_tokenizer_file(result.out.with_name(result.out.name + ".partial") / "tokenizer"),
        engines={},
        validation=[r.to_dict() for r in result.reports],
        lint=result.lint,
    )
