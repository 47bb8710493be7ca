"""`turbotrt`: a thin command line over the library; every command calls a public function.

Heavy modules (torch, onnx, TensorRT) are imported inside the commands that need them, so `--help`
is fast and the torch-free runtime install can still run the commands that do not need torch.
Option choices come from the configs that own them (presets, precisions, attention modes,
observers, build settings), never repeated here.

One error path: an expected failure (bad input, bad file or bundle, missing package, full disk,
read-only folder, unsupported target) prints one line and exits 1 (2 for usage errors); anything
else is a bug: one line saying so and how to see the traceback (--debug or TURBOTRT_DEBUG=1), exit 3.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import click

from turbotrt.build.plan import HARDWARE_COMPATIBILITY
from turbotrt.build.rtx import TARGETS as RTX_TARGETS
from turbotrt.calibration.config import MODES, OBSERVERS
from turbotrt.core.configs import ATTENTION_MODES, PRESETS, RESOLUTIONS
from turbotrt.core.errors import MissingDependencyError, TurbotrtError
from turbotrt.core.precision import FLOAT_PRECISIONS, PRECISIONS
from turbotrt.core.sagesla import V_DTYPES
from turbotrt.plugins.sagesla.aot import SUPPORTED_TARGETS

BUG_EXIT = 3
SEEDS = click.IntRange(0, 2**64 - 1)
DEFAULT_PROMPT = "a red bird flies over a river at night"


def _os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run again (nothing half-written was kept)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write or read{where}: {e.strerror}; choose a folder you can write to"
    return f"{e.strerror or e}{where}"


class Group(click.Group):
    """The one place that turns exceptions into messages and exit codes."""

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("TURBOTRT_DEBUG") not in (None, "", "0")
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("turbotrt: interrupted (partial outputs were removed)", err=True)
            sys.exit(130)
        except (TurbotrtError, ValueError, OSError) as e:
            if debug:
                raise
            message = _os_error(e) if isinstance(e, OSError) and not isinstance(e, TurbotrtError) else str(e)
            raise click.ClickException(message) from None
        except Exception as e:  # not an expected failure: a bug
            if debug:
                raise
            click.echo(f"turbotrt: internal error (a bug in turbotrt): {type(e).__name__}: {e}\n"
                       "Run again with --debug (or TURBOTRT_DEBUG=1) to see the traceback, and report it.", err=True)
            sys.exit(BUG_EXIT)


def needs_torch(what: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs PyTorch, which the runtime-only install leaves out: pip install 'turbotrt[export]' "
            "(install torch first to choose its build)") from None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _check_output_file(path: str, force: bool) -> None:
    """Refuse before any work: an existing file (unless --force), a folder, an unwritable parent."""
    from pathlib import Path

    from turbotrt.core.files import check_writable

    p = Path(path)
    if p.is_dir():
        raise TurbotrtError(f"{p} is a folder; give a file name for the video (e.g. {p / 'video.mp4'})")
    if p.exists() and not force:
        raise TurbotrtError(f"{p} exists; pass --force to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise TurbotrtError(f"folder {parent} does not exist; create it first")
    check_writable(parent)


def _check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise click.BadParameter("the prompt is empty; say what the video should show", param_hint="--prompt")
    return prompt


def _read_image(path: str, profile):
    """The I2V first frame as uint8 [H, W, 3] at the bundle's size, checked before any work."""
    import av
    import numpy as np

    try:
        with av.open(str(path)) as src:
            image = next(src.decode(video=0)).to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration, OSError) as e:
        raise click.BadParameter(f"{path} is not a readable image ({e})", param_hint="--image") from None
    if image.shape[:2] != (profile.height, profile.width):
        raise click.BadParameter(f"{path} is {image.shape[1]}x{image.shape[0]}; the bundle was exported for "
                                 f"{profile.width}x{profile.height}: resize it first", param_hint="--image")
    return np.ascontiguousarray(image)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="turbotrt")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: TURBOTRT_DEBUG=1).")
def main(debug):
    """Turn TurboDiffusion video models (Wan2.1/2.2 with SLA sparse attention, rCM few-step
    sampling and W8A8) into ONNX graphs and TensorRT engines, and run them without PyTorch.

    \b
    turbotrt demo                       the built-in tiny model, exported and run on a CPU
    turbotrt export CKPT --out B        a checkpoint -> a bundle of validated ONNX graphs
    turbotrt calibrate B --out B8       INT8/FP8 Q/DQ for TensorRT, with a quality report
    turbotrt build B --target sm_90     TensorRT engines (or --dry-run: the plan, anywhere)
    turbotrt validate B                 every graph and the whole pipeline against PyTorch
    turbotrt run B --prompt "..."       a video, with no PyTorch in the loop
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
def presets(as_json):
    """List the model presets and the resolutions each supports."""
    if as_json:
        click.echo(json.dumps({n: c.to_dict() for n, c in PRESETS.items()}, indent=2))
        return
    for name, c in PRESETS.items():
        kind = "I2V, experts " + "/".join(c.experts) if c.experts else "T2V"
        click.echo(f"{name:18s} dim {c.dim:5d}  layers {c.num_layers:2d}  heads {c.num_heads:2d}  {kind:22s} "
                   f"resolutions {', '.join(c.resolutions)} (default {c.default_resolution}, {c.default_frames} frames)")
    click.echo("\nresolutions (width x height):")
    for res, aspects in RESOLUTIONS.items():
        click.echo(f"  {res:5s} " + ", ".join(f"{a} {w}x{h}" for a, (w, h) in aspects.items()))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def inspect(checkpoint, as_json):
    """Show what a DiT CHECKPOINT (.pth or .safetensors) holds: preset, dtype, quantization, size.

    Nothing is executed from the file: .pth files are read weights-only."""
    needs_torch("inspecting a checkpoint")
    from turbotrt.models.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"checkpoint    {info['path']} ({_human_bytes(info['file_bytes'])})")
    click.echo(f"preset        {info['preset'] or 'none matches (shapes: ' + json.dumps(info['shapes']) + ')'}")
    click.echo(f"dtype         {info['dtype']}  ({', '.join(f'{k}: {v:,}' for k, v in info['dtypes'].items())})")
    click.echo(f"quantization  {info['quantization']}")
    click.echo(f"parameters    {info['parameters']:,} in {info['tensors']} tensors ({_human_bytes(info['tensor_bytes'])})")
    problems = info.get("problems")
    if problems:
        raise TurbotrtError("does not load as that preset:\n  " + "\n  ".join(problems))
    if info["preset"]:
        click.echo("loads         yes (strict)")


@main.command("random-checkpoint")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="wan-tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, type=SEEDS, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--quant", is_flag=True, help="Write the W8A8 `-quant` layout (int8 weights, 128x128 tile scales).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def random_checkpoint(out, preset, seed, dtype, quant, force):
    """Write a DiT checkpoint with seeded random weights in TurboDiffusion's key layout.

    For trying the tools without real weights. OUT ends in .safetensors (written one tensor at a
    time, so even the 14B presets fit in memory) or .pth (built in memory first); written atomically."""
    needs_torch("writing a checkpoint")
    from tqdm import tqdm

    from turbotrt.core.configs import get_config
    from turbotrt.models.checkpoint import save_state_dict, write_safetensors_streaming
    from turbotrt.models.wan import random_wan_entries

    _check_output_file(out, force)
    entries = random_wan_entries(get_config(preset), seed=seed, dtype=dtype, quantized=quant)
    if out.lower().endswith(".safetensors"):
        write_safetensors_streaming(tqdm(entries, desc="tensors", leave=False), out)
    else:
        save_state_dict({name: make() for name, _, _, make in tqdm(entries, desc="tensors", leave=False)}, out)
    click.echo(f"wrote {out}: {preset}, {dtype}{', -quant' if quant else ''}, seed {seed}")


# --- export and calibration -----------------------------------------------------------------------------

def _calibration_options(f, short: bool = False):
    """Options shared by `export --precision int8|fp8` and `calibrate` (which also spells --calib-steps and
    --calib-seed as --steps and --seed: it has no other steps or seed)."""
    steps = ("--calib-steps", "--steps") if short else ("--calib-steps",)
    seed = ("--calib-seed", "--seed") if short else ("--calib-seed",)
    options = [
        click.option("--observer", type=click.Choice(OBSERVERS), default=None,
                     help="int8/fp8: how activation ranges are chosen [default: percentile for int8, max for fp8]."),
        click.option("--percentile", type=float, default=99.99, show_default=True,
                     help="int8/fp8: kept share of |x| (%) for the percentile observer."),
        click.option("--smoothquant", "alpha", type=float, default=None,
                     help="int8/fp8: SmoothQuant alpha in [0, 1] (off by default)."),
        click.option("--prompt", "prompts", multiple=True, help="int8/fp8: a calibration prompt (repeatable)."),
        click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
                     help="int8/fp8: one calibration prompt per line."),
        click.option("--embeddings", type=click.Path(exists=True, dir_okay=False),
                     help="int8/fp8: precomputed umT5 embeddings (.npy/.safetensors, [N, text_len, text_dim]) "
                          "instead of prompts."),
        click.option(*steps, "calib_steps", type=click.IntRange(1, 4), default=4, show_default=True,
                     help="int8/fp8: rCM steps of the calibration trajectories."),
        click.option(*seed, "calib_seeds", type=SEEDS, multiple=True,
                     help="int8/fp8: noise seed of a calibration trajectory (repeatable) [default: 0]."),
        click.option("--eval-seed", "eval_seeds", type=SEEDS, multiple=True,
                     help="int8/fp8: seeds of the quality report [default: one past the calibration seeds]."),
        click.option("--exclude", multiple=True,
                     help="int8/fp8: keep Linears matching this pattern in float, e.g. 'blocks.0.*'."),
        click.option("--cache", type=click.Path(exists=True, dir_okay=False),
                     help="int8/fp8: reuse a calibration cache made with the same settings."),
        click.option("--device", default="cpu", show_default=True,
                     help="int8/fp8: where the PyTorch models of calibration run, e.g. cuda."),
        click.option("--no-eval", is_flag=True, help="int8/fp8: skip the quality report's measurements."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _prompts(prompts, prompts_file):
    from pathlib import Path

    found = list(prompts)
    if prompts_file:
        found += [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    return tuple(found) or None


def _progress():
    from tqdm import tqdm

    def bar(items, desc: str = "weights"):
        return tqdm(items, desc=f"  {desc}", leave=False, file=sys.stderr)

    return bar


def _calibrate(source, out, mode, calib: dict, text_encoder, tokenizer, checkpoint=None, export_options=None,
               validate=None, verify=True, force=False, log=click.echo):
    from turbotrt.calibration.api import calibrate

    return calibrate(
        source, out, mode=mode, observer=calib["observer"], percentile=calib["percentile"],
        smoothquant=calib["alpha"], prompts=_prompts(calib["prompts"], calib["prompts_file"]),
        steps=calib["calib_steps"], seeds=calib["calib_seeds"] or (0,), exclude=calib["exclude"],
        embeddings=calib["embeddings"], checkpoint=checkpoint, text_encoder=text_encoder, tokenizer=tokenizer,
        cache=calib["cache"], eval_seeds=calib["eval_seeds"] or None, export_options=export_options,
        validate=validate, evaluate=not calib["no_eval"], device=calib["device"], force=force, verify=verify,
        log=log, progress=_progress())


_CALIB_KEYS = ("observer", "percentile", "alpha", "prompts", "prompts_file", "embeddings", "calib_steps",
               "calib_seeds", "eval_seeds", "exclude", "cache", "device", "no_eval")
_CALIB_DEFAULTS = dict(observer=None, percentile=99.99, alpha=None, prompts=(), prompts_file=None, embeddings=None,
                       calib_steps=4, calib_seeds=(), eval_seeds=(), exclude=(), cache=None, device="cpu",
                       no_eval=False)


@main.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
@click.option("--resolution", type=click.Choice(list(RESOLUTIONS)), default=None,
              help="Video resolution (default: the preset's).")
@click.option("--aspect", type=click.Choice(["16:9", "9:16", "1:1"]), default="16:9", show_default=True)
@click.option("--frames", type=int, default=None, help="Video frames, 4k+1 (default: the preset's, 81 for real models).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True,
              help="Weights and activations; norms, modulation and the head stay fp32. int8/fp8: the float "
              "export, then calibration of the DiT into explicit Q/DQ (see the int8/fp8 options).")
@click.option("--float-precision", type=click.Choice(FLOAT_PRECISIONS), default=None,
              help="int8/fp8: the type of everything that is not quantized [default: fp32].")
@click.option("--attention", type=click.Choice(ATTENTION_MODES), default="sagesla", show_default=True,
              help="Self-attention: SageSLA custom op (low-bit plugin in TensorRT), SLA (float) or dense.")
@click.option("--sla-topk", type=float, default=None, help="Fraction of key blocks kept (default: preset's, 0.1).")
@click.option("--block-q", type=int, default=None, help="SLA query block (default: preset's, 128).")
@click.option("--block-k", type=int, default=None, help="SLA key block (default: preset's, 64).")
@click.option("--v-dtype", type=click.Choice(V_DTYPES), default="fp8", show_default=True,
              help="SageSLA V/P type: fp8 for sm89/sm90/sm120, fp16 for sm80.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Preset of a checkpoint whose shapes do not identify it.")
@click.option("--low-noise", type=click.Path(exists=True, dir_okay=False), default=None,
              help="I2V A14B: the low-noise expert's checkpoint (SOURCE is the high-noise one).")
@click.option("--text-encoder", "text_encoder", type=click.Path(exists=True, dir_okay=False), default=None,
              help="umT5 checkpoint (models_t5_umt5-xxl-enc-bf16.pth) to include (and to encode calibration prompts).")
@click.option("--vae", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Wan VAE checkpoint (Wan2.1_VAE.pth) to include.")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), default=None,
              help="umT5 sentencepiece model (spiece.model) or tokenizer.json to ship in the bundle.")
@click.option("--seed", default=0, show_default=True, type=SEEDS,
              help="Seed of the tiny presets' weights and of validation inputs.")
@click.option("--validate/--no-validate", default=None,
              help="Compare ONNX Runtime with PyTorch (default: on for small models).")
@click.option("--target", default=None,
              help="Also build TensorRT engines for this GPU (auto = this machine's, or "
                   f"{', '.join(SUPPORTED_TARGETS)}): needs TensorRT and that GPU. Default: ONNX only.")
@_calibration_options
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out (only when the new one is complete).")
def export(source, out, resolution, aspect, frames, precision, float_precision, attention, sla_topk, block_q, block_k,
           v_dtype, preset, low_noise, text_encoder, vae, tokenizer, seed, validate, target, force, **calib):
    """Export SOURCE (a DiT checkpoint, or a tiny preset such as wan-tiny) to a bundle in --out.

    The bundle holds the DiT (each I2V expert), umT5 and the VAE step graphs as ONNX with external
    weights, the tokenizer and manifest.json (shapes, sampler, attention geometry, sha256 of every
    file). Self-attention becomes one turbodiffusion::SageSLA node per layer, carrying its reference math
    as an ONNX function (ONNX Runtime runs it; TensorRT swaps in the plugin). Weights stream from
    the checkpoint into external data, one tensor at a time. --precision int8|fp8 calibrates the
    DiT into explicit Q/DQ in the same run (the float graph never leaves the new bundle's folder)."""
    needs_torch("export")
    from turbotrt.build.plan import BuildOptions

    build_options = BuildOptions(target=target) if target else None  # a bad target stops us before any work
    quantized = precision in MODES
    if not quantized:
        changed = sorted(k for k in _CALIB_KEYS if calib[k] != _CALIB_DEFAULTS[k])
        if changed or float_precision:
            names = ", ".join("--" + k.replace("_", "-") for k in changed + (["float_precision"] if float_precision else []))
            raise click.UsageError(f"{names} apply to --precision int8/fp8 only; this is a {precision} export")
    options = dict(resolution=resolution, frames=frames, aspect=aspect, attention=attention, sla_topk=sla_topk,
                   block_q=block_q, block_k=block_k, v_dtype=v_dtype, preset=preset, low_noise=low_noise)
    if quantized:
        _calibrate(source, out, precision, calib, text_encoder, tokenizer, force=force, validate=validate,
                   export_options=dict(options, vae_ckpt=vae, seed=seed, float_precision=float_precision))
        click.echo(f"exported {precision} bundle to {out}")
    else:
        from turbotrt.export.api import export as export_bundle

        result = export_bundle(source, out, precision=precision, text_encoder=text_encoder, vae=vae,
                               tokenizer=tokenizer, seed=seed, validate=validate, force=force, log=click.echo,
                               progress=_progress(), **options)
        click.echo(f"exported {', '.join(result.graphs)} to {result.out} in {result.seconds:.1f} s")
        if not result.passed:
            raise TurbotrtError("validation failed: see the report above (the bundle was written; fix the cause "
                                "and export again)")
    if build_options is None:
        click.echo(f"engines: not built (ONNX only); `turbotrt build {out} --target ...` builds them")
        return
    from turbotrt.build.tensorrt import build_engines

    build_engines(out, build_options, log=click.echo, verify=False)


@main.command()
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder of the quantized bundle.")
@click.option("--mode", type=click.Choice(MODES), default="int8", show_default=True,
              help="int8: activations per tensor, weights per output channel; fp8: e4m3, both per tensor.")
@lambda f: _calibration_options(f, short=True)
@click.option("--attention", type=click.Choice(ATTENTION_MODES), default="sla", show_default=True,
              help="Attention of the float export, when SOURCE is a preset or checkpoint.")
@click.option("--text-encoder", type=click.Path(exists=True, dir_okay=False),
              help="umT5 checkpoint to encode prompts (when the bundle has no text encoder).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="Tokenizer of the umT5 checkpoint.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="A TurboDiffusion -quant checkpoint: start from its int8 weights.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the source bundle's files.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUT (only when the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def calibrate(source, out, mode, attention, text_encoder, tokenizer, checkpoint, no_verify, force, as_json, **calib):
    """Calibrate the DiT of SOURCE (an exported float bundle, a tiny preset or a checkpoint) to INT8
    or FP8 and write a bundle whose graph carries explicit Q/DQ for TensorRT, plus its calibration
    cache and a quality report (per rCM step and final latent, ONNX Runtime and PyTorch vs float).

    A preset or checkpoint SOURCE is exported with the defaults of `turbotrt export` on the way;
    `turbotrt export --precision int8` takes every export option."""
    needs_torch("calibration")
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    from pathlib import Path

    if Path(source).is_dir() and attention != "sla":
        raise click.UsageError("--attention applies when SOURCE is a preset or checkpoint; a bundle keeps its own")
    export_options = None if Path(source).is_dir() else dict(attention=attention)
    report = _calibrate(source, out, mode, calib, text_encoder, tokenizer, checkpoint=checkpoint,
                        export_options=export_options, verify=not no_verify, force=force, log=log)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))


# --- engines ----------------------------------------------------------------------------------------------

@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--runtime", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default="tensorrt", show_default=True,
              help="tensorrt: standard TensorRT, SageSLA as the AOT plugin, built on the target GPU. tensorrt-rtx: "
                   "TensorRT for RTX, built on any machine (no GPU needed), SageSLA as its ONNX function body.")
@click.option("--target", "targets", multiple=True,
              help=f"GPU the engines are for (repeat for several with tensorrt-rtx): auto (this machine's GPU), or "
                   f"tensorrt: {', '.join(SUPPORTED_TARGETS)}; tensorrt-rtx: {', '.join(RTX_TARGETS)}. Default: auto.")
@click.option("--network", "networks", multiple=True,
              help="Build only this network (repeat for several); default: every network of the bundle.")
@click.option("--dry-run", is_flag=True,
              help="Write the build plan (JSON) and stop: needs neither TensorRT nor a GPU.")
@click.option("--plan-out", type=click.Path(dir_okay=False),
              help="Write the plan to this file (atomically); a dry run prints it when this is not given.")
@click.option("--workspace-gib", type=float, default=None,
              help="Cap the builder's workspace, in GiB (default: the builder's).")
@click.option("--timing-cache", "timing_cache_dir", type=click.Path(file_okay=False), default=None,
              help="tensorrt: folder of timing caches, one per GPU and TensorRT version, reused across builds "
                   "(default: ~/.cache/turbotrt/timing-cache).")
@click.option("--no-timing-cache", is_flag=True, help="tensorrt: neither read nor write a timing cache.")
@click.option("--hardware-compatibility", type=click.Choice(list(HARDWARE_COMPATIBILITY)), default="none",
              show_default=True,
              help="tensorrt: engines that also run on other GPUs: ampere_plus (any Ampere or newer) or "
                   "same_compute_capability; slower, and the SageSLA kernel stays specific to the building GPU.")
@click.option("--version-compatible", is_flag=True,
              help="tensorrt: engines that newer TensorRT versions (same major) can load, through the lean runtime.")
@click.option("--refittable", is_flag=True, help="tensorrt: engines whose weights can be replaced without a rebuild.")
@click.option("--weight-stripped", is_flag=True,
              help="tensorrt: leave the weights out of the engines (small files); they are refitted from the "
                   "bundle's ONNX weights when loaded.")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None,
              help="Builder optimization level, 0-5 (default: the builder's, 3); higher builds longer.")
@click.option("--tf32", is_flag=True, help="Allow TF32 for fp32 GEMMs (faster, less exact than fp32 validation).")
@click.option("--tensorrt-version", default=None,
              help="tensorrt, for a dry run without TensorRT: the version the build will use (names the timing cache).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files before building.")
def build(bundle, runtime, targets, networks, dry_run, plan_out, workspace_gib, timing_cache_dir, no_timing_cache,
          hardware_compatibility, version_compatible, refittable, weight_stripped, optimization_level, tf32,
          tensorrt_version, no_verify):
    """Build engines for the networks of BUNDLE (a folder from `turbotrt export`), written to
    BUNDLE/engines/<runtime>/<target>/<network>.plan and recorded in manifest.json.

    Each ONNX graph is parsed as a strongly typed network (its types and explicit Q/DQ set the
    precision) with its static shapes as the only optimization profile.

    \b
    --runtime tensorrt (default): SageSLA nodes become the turbodiffusion::SageSLA plugin with its
      ahead-of-time kernel embedded. Needs TensorRT (>= 10.9) and the GPU the engines are for;
      --dry-run needs neither: it writes the plan and lists what would stop the build.
    --runtime tensorrt-rtx: TensorRT for RTX (pip install 'turbotrt[rtx]') builds on any machine,
      GPU or not, for RTX-class GPUs; it has no plugins, so SageSLA runs as its ONNX function body
      (the gather-based float sparse core). Running the engines needs the GPU."""

    from turbotrt.core.bundle import Bundle

    if runtime == "tensorrt-rtx":
        given = [flag for flag, value in (
            ("--timing-cache", timing_cache_dir), ("--no-timing-cache", no_timing_cache),
            ("--hardware-compatibility", hardware_compatibility != "none"), ("--version-compatible", version_compatible),
            ("--refittable", refittable), ("--weight-stripped", weight_stripped), ("--tensorrt-version", tensorrt_version),
        ) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to --runtime tensorrt only: TensorRT for RTX has no timing "
                                   "cache, hardware or version compatibility, and refit/stripped builds need a GPU")
        from turbotrt.build.rtx import RtxOptions, build_rtx_engines, plan_rtx

        options = RtxOptions(targets=tuple(targets) or ("auto",), networks=tuple(networks) or None,
                             workspace_gib=workspace_gib, optimization_level=optimization_level, tf32=tf32)
        if dry_run:
            plan = plan_rtx(Bundle.load(bundle, verify=not no_verify), options)
            _emit_plan(plan, plan_out, f"{len(plan.networks)} engines for {', '.join(plan.targets)}")
            return
        result = build_rtx_engines(bundle, options, log=click.echo, verify=not no_verify, plan_out=plan_out)
        click.echo(f"built {len(result.engines)} TensorRT for RTX engines for {', '.join(result.plan.targets)} in "
                   f"{result.seconds:.1f} s")
        return
    from turbotrt.build.plan import BuildOptions, plan_build

    if len(targets) > 1:
        raise click.UsageError("standard TensorRT builds for the GPU it runs on: give one --target (several targets "
                               "are for --runtime tensorrt-rtx)")
    options = BuildOptions(
        target=targets[0] if targets else "auto", workspace_gib=workspace_gib, timing_cache=not no_timing_cache,
        timing_cache_dir=timing_cache_dir, hardware_compatibility=hardware_compatibility,
        version_compatible=version_compatible, refittable=refittable, weight_stripped=weight_stripped,
        networks=tuple(networks) or None, optimization_level=optimization_level, tf32=tf32,
        tensorrt_version=tensorrt_version,
    )
    if dry_run:
        plan = plan_build(Bundle.load(bundle, verify=not no_verify), options)
        _emit_plan(plan, plan_out, f"{len(plan.networks)} networks for {plan.target}")
        return
    from turbotrt.build.tensorrt import build_engines

    result = build_engines(bundle, options, log=click.echo, verify=not no_verify, plan_out=plan_out)
    click.echo(f"built {', '.join(result.engines)} for {result.plan.target} in {result.seconds:.1f} s")


def _emit_plan(plan, plan_out, what: str) -> None:
    from pathlib import Path

    from turbotrt.core.files import write_atomic

    if plan_out:
        Path(plan_out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(plan_out), plan.to_json())
        click.echo(f"wrote the build plan of {what} to {plan_out}")
    else:
        click.echo(plan.to_json(), nl=False)
    for w in plan.warnings:
        click.echo(f"warning: {w}", err=True)
    if plan.problems:
        click.echo("a build would stop on:\n  - " + "\n  - ".join(plan.problems), err=True)


# --- running --------------------------------------------------------------------------------------------

BACKEND_HELP = ("auto: TensorRT engines for this GPU when present, then TensorRT for RTX engines, else ONNX Runtime "
                "(it says which and why).")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="What the video shows.")
@click.option("--out", default="video.mp4", show_default=True, type=click.Path(dir_okay=False))
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4), help="rCM steps (1-4).")
@click.option("--seed", default=0, show_default=True, type=SEEDS)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="I2V bundles: the first frame, at the bundle's resolution.")
@click.option("--ode", is_flag=True, help="Deterministic ODE sampling (I2V) instead of rCM's SDE steps.")
@click.option("--backend", type=click.Choice(["auto", "trt", "rtx", "ort"]), default="auto", show_default=True,
              help=BACKEND_HELP)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the sha256 of every bundle file before loading (slow for large bundles).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def run(bundle, prompt, out, steps, seed, image, ode, backend, verify, force):
    """Generate a video from BUNDLE with the lean runtime (no PyTorch)."""
    import time

    from turbotrt.runtime.pipeline import Pipeline

    start = time.perf_counter()
    _check_prompt(prompt)
    _check_output_file(out, force)
    pipe = Pipeline.from_bundle(bundle, backend=backend, verify=verify, log=click.echo)
    if pipe.model.is_i2v and image is None:
        raise click.UsageError(f"{pipe.model.name} is image-to-video: pass the first frame with --image")
    if not pipe.model.is_i2v and image is not None:
        raise click.UsageError(f"{pipe.model.name} is text-to-video: it takes no --image")
    frame = _read_image(image, pipe.bundle.profile) if image else None
    result = pipe(prompt, seed=seed, steps=steps, image=frame, ode=ode)
    result.save(out)
    t, h, w, _ = result.frames.shape
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    click.echo(f"wrote {out}: {t} frames {w}x{h}, {steps} steps, seed {seed} ({time.perf_counter() - start:.1f} s; {stages})")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--seed", default=0, show_default=True, type=SEEDS)
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
@click.option("--allow-skips", is_flag=True,
              help="Exit 0 even when some checks could not run here (they are still listed).")
@click.option("--rtx/--no-rtx", default=True, show_default=True,
              help="Ask TensorRT for RTX's parser and builder about every graph (when tensorrt_rtx is installed; "
                   "no GPU needed; minutes for full-size models).")
def validate(bundle, prompt, seed, steps, json_out, allow_skips, rtx):
    """Check BUNDLE: each graph in ONNX Runtime against PyTorch (weights read from the bundle),
    TensorRT against ONNX Runtime where TensorRT and engines are here, each graph through TensorRT
    for RTX's parser and builder where it is installed, and the runtime against the PyTorch
    reference pipeline end to end (same prompt and seed).

    A check that cannot run here (e.g. bf16 graphs on a CPU) is listed, and makes the command fail
    unless --allow-skips: it never says "valid" about what it did not check."""
    needs_torch("validation")
    from turbotrt.core.files import write_atomic
    from turbotrt.validation import validate_bundle

    _check_prompt(prompt)
    result = validate_bundle(bundle, prompt=prompt, seed=seed, steps=steps, rtx=rtx, log=click.echo)
    if json_out:
        report = dict(graphs=[r.to_dict() for r in result.graphs], skipped=result.skipped,
                      end_to_end=result.end_to_end, rtx=result.rtx, quantization=result.quantization,
                      passed=result.passed)
        write_atomic(json_out, json.dumps(report, indent=2, default=str))
    if not result.passed:
        raise TurbotrtError("validation failed: see the report above")
    if result.skipped and not allow_skips:
        raise TurbotrtError(f"{len(result.skipped)} checks could not run here (listed above); nothing failed, but the "
                            "bundle is not fully validated: run where they can, or pass --allow-skips")
    click.echo("bundle valid" + (f" ({len(result.skipped)} checks skipped, allowed)" if result.skipped else ""))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--backend", type=click.Choice(["auto", "trt", "rtx", "ort"]), default="auto", show_default=True,
              help=BACKEND_HELP)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the sha256 of every bundle file before loading.")
def bench(bundle, steps, repeat, backend, verify):
    """Per-stage latency of BUNDLE (text, each step, VAE; median of --repeat runs) and peak memory."""
    import resource
    import statistics
    import time

    import numpy as np

    from turbotrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, backend=backend, verify=verify, log=click.echo)
    image = None
    if pipe.model.is_i2v:  # a synthetic first frame: timing does not depend on its content
        p = pipe.bundle.profile
        image = np.zeros((p.height, p.width, 3), np.uint8)
    start = time.perf_counter()
    pipe("warm-up", seed=0, steps=steps, image=image)
    click.echo(f"first run (loads every graph): {time.perf_counter() - start:.2f} s")
    runs = [pipe(DEFAULT_PROMPT, seed=i, steps=steps, image=image).timings for i in range(repeat)]
    click.echo(f"{pipe.backend.describe()}, {repeat} runs, median seconds:")
    for stage in runs[0]:
        click.echo(f"  {stage:8s} {statistics.median(r[stage] for r in runs):8.3f}")
    click.echo(f"  {'total':8s} {statistics.median(sum(r.values()) for r in runs):8.3f}")
    click.echo(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


@main.command()
def doctor():
    """What this machine has (Python, PyTorch, ONNX Runtime, TensorRT, Triton, GPU) and what runs here."""
    import importlib
    import platform

    from turbotrt.core.gpu import gpus

    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception as e:  # a broken install is worth reporting, not crashing on
            return None if isinstance(e, ImportError) else f"broken ({e})"

    found = gpus()
    v = {m: version(m) for m in ("torch", "onnxruntime", "onnx", "tensorrt", "tensorrt_rtx", "triton", "polygraphy",
                                 "ray")}
    click.echo(f"python        {platform.python_version()} ({platform.machine()})")
    for m, ver in v.items():
        click.echo(f"{m:13s} {ver or 'not installed'}")
    if v["onnxruntime"]:
        import onnxruntime

        click.echo(f"ort providers {', '.join(onnxruntime.get_available_providers())}")
    click.echo("gpu           " + ("; ".join(f"{g['name']} ({g['compute_capability']}, {g['memory_mib']} MiB)"
                                           for g in found) or "none found (nvidia-smi)"))
    click.echo("\ncan run here:")
    click.echo(f"  bundles with ONNX Runtime      {'yes' if v['onnxruntime'] else 'no: pip install onnxruntime'}")
    click.echo(f"  export / validate / reference  {'yes' if v['torch'] else 'no: pip install turbotrt[export]'}")
    trt_ok = bool(v["tensorrt"]) and bool(found)
    click.echo(f"  TensorRT engines (build, run)  {'yes' if trt_ok else 'no: needs TensorRT >= 10.9 and an NVIDIA GPU'}")
    rtx = v["tensorrt_rtx"]
    click.echo("  TensorRT for RTX engines       " + (
        ("build: yes; run: " + ("yes" if found else "no (needs an RTX-class NVIDIA GPU)")) if rtx
        else "no: pip install 'turbotrt[rtx]' (builds without a GPU)"))
    click.echo(f"  serving (turbotrt serve)       {'yes' if v['ray'] else 'no: pip install turbotrt[serve]'}")
    click.echo(f"  SageSLA Triton kernels         {'yes' if v['triton'] and found else 'interpreter/PTX only (no GPU)' if v['triton'] else 'no: needs triton'}")


DEMO_PROMPT = "a red circle moves right"


@main.command()
@click.option("--out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where the bundle and the video go.")
@click.option("--prompt", default=DEMO_PROMPT, show_default=True,
              help="A caption of the toy set: 'a COLOUR SHAPE moves DIRECTION' with COLOUR red, green, blue or "
                   "yellow, SHAPE circle, square or triangle, DIRECTION left, right, up or down. Anything else "
                   "is an error: the toy model knows only these.")
@click.option("--seed", default=0, show_default=True, type=SEEDS)
def demo(out, prompt, seed):
    """Export the built-in trained toy model into a bundle and generate a video from it on the CPU.

    The toy model is the tiny presets (Wan DiT with SLA attention, umT5, Wan VAE) trained on synthetic
    videos of coloured shapes moving across a plain background (`python -m turbotrt.toy.train`); its
    weights ship with the package in the real checkpoints' layouts and export like a real model. Writes
    OUT/turbotrt-demo-bundle (ONNX graphs, tokenizer, manifest; replaced if it is there) and
    OUT/turbotrt-demo.mp4, running the bundle with ONNX Runtime and no PyTorch in the loop (4 rCM
    steps), then checks the video against the prompt (colour and direction of motion)."""
    needs_torch("the demo (it exports the toy model first)")
    import resource
    import time
    from pathlib import Path

    from turbotrt.runtime.pipeline import Pipeline
    from turbotrt.toy.dataset import parse_caption
    from turbotrt.toy.model import export_toy
    from turbotrt.toy.score import score_video

    try:
        prompt = str(parse_caption(_check_prompt(prompt)))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prompt") from None
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video_path = out / "turbotrt-demo.mp4"
    _check_output_file(str(video_path), force=True)
    bundle = out / "turbotrt-demo-bundle"
    result = export_toy(bundle, precision="fp32", attention="sagesla", force=True, log=click.echo)
    if not result.passed:
        raise TurbotrtError("the exported graphs did not validate; see the reports above")
    pipe = Pipeline.from_bundle(bundle, backend="ort", log=click.echo)
    video = pipe(prompt, seed=seed, steps=4)
    path = video.save(video_path)
    t, h, w, _ = video.frames.shape
    click.echo(f"wrote {path}: {t} frames {w}x{h} from {bundle} in {time.perf_counter() - start:.1f} s "
               f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
    s = score_video(video.frames, prompt)
    click.echo(f"prompt check: {s.colour or 'no'} shape, moving {s.direction or 'nowhere clear'} "
               f"(travel {s.travel[0]:+.0f}, {s.travel[1]:+.0f} px): {'pass' if s.passed else 'FAIL'}")


@main.command()
@click.option("--preset", type=click.Choice([p for p in PRESETS if p.startswith("wan-tiny")]), default="wan-tiny",
              show_default=True, help="A tiny preset (built-in seeded random weights).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True)
@click.option("--out", default="turbotrt-reference.mp4", show_default=True, type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True, type=SEEDS)
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4), help="rCM steps (1-4).")
@click.option("--frames", type=int, default=None, help="Video frames, 4k+1 (default: the preset's).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def generate(preset, prompt, out, seed, steps, frames, force):
    """Generate a video with the PyTorch reference pipeline (umT5 -> DiT with rCM -> Wan VAE).

    Runs the built-in tiny presets on a CPU in seconds: their weights are random, so the video is
    noise-like; it proves the whole chain, not a model."""
    needs_torch("the reference pipeline")
    import time

    from turbotrt.models.pipeline import generate as generate_video

    _check_prompt(prompt)
    _check_output_file(out, force)
    if PRESETS[preset].is_i2v:
        raise click.UsageError(f"{preset} is image-to-video; `generate` runs the text-to-video tiny preset")
    start = time.perf_counter()
    video = generate_video(preset, prompt, out, seed=seed, steps=steps, frames=frames)
    t, h, w, _ = video.frames.shape
    click.echo(f"wrote {out}: {t} frames {w}x{h} at {video.fps} fps, {steps} steps, seed {seed} "
               f"({time.perf_counter() - start:.1f} s)")


from turbotrt.serve.cli import serve_command  # noqa: E402 (click only: Ray is imported when the command runs)

main.add_command(serve_command, "serve")

if __name__ == "__main__":
    main()
