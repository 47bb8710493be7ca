"""`turbotrt`: a thin command line over the library; every command calls a public function.

Heavy modules (torch, onnx) are imported inside the commands that need them, so `--help` is fast
and the torch-free runtime install can still run the commands that do not need torch.
"""

from __future__ import annotations

import json
import sys

import click


def _needs_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "this command needs PyTorch, which the runtime-only install leaves out: "
            "pip install 'turbotrt[export]' (install torch first to choose its build)"
        ) from None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="turbotrt")
def main():
    """Turn TurboDiffusion video models (Wan2.1/2.2 with SLA sparse attention, rCM few-step
    sampling and W8A8) into ONNX graphs and TensorRT engines, and run them without PyTorch."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
def presets(as_json):
    """List the model presets and the resolutions each supports."""
    from turbotrt.models.configs import PRESETS, RESOLUTIONS

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
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def inspect(checkpoint, as_json):
    """Show what a DiT CHECKPOINT (.pth or .safetensors) holds: preset, dtype, quantization, size.

    Nothing is executed from the file: .pth files are read weights-only."""
    _needs_torch()
    from turbotrt.models.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(checkpoint)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
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
        click.echo("does not load as that preset:\n  " + "\n  ".join(problems))
        sys.exit(1)
    elif info["preset"]:
        click.echo("loads         yes (strict)")


@main.command("random-checkpoint")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--preset", default="wan-tiny", show_default=True, help="Model preset (see `turbotrt presets`).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--quant", is_flag=True, help="Write the W8A8 `-quant` layout (int8 weights, 128x128 tile scales).")
def random_checkpoint(out, preset, seed, dtype, quant):
    """Write a DiT checkpoint with seeded random weights in TurboDiffusion's key layout.

    For trying the tools without real weights. OUT ends in .safetensors (written one tensor at a
    time, so even the 14B presets fit in memory) or .pth (built in memory first)."""
    _needs_torch()
    from tqdm import tqdm

    from turbotrt.models.checkpoint import CheckpointError, save_state_dict, write_safetensors_streaming
    from turbotrt.models.configs import get_config
    from turbotrt.models.wan import random_wan_entries

    try:
        config = get_config(preset)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--preset") from None
    entries = random_wan_entries(config, seed=seed, dtype=dtype, quantized=quant)
    try:
        if out.lower().endswith(".safetensors"):
            write_safetensors_streaming(tqdm(entries, desc="tensors", leave=False), out)
        else:
            save_state_dict({name: make() for name, _, _, make in tqdm(entries, desc="tensors", leave=False)}, out)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}: {preset}, {dtype}{', -quant' if quant else ''}, seed {seed}")


@main.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
@click.option("--resolution", default=None, help="480p, 720p or tiny (default: the preset's).")
@click.option("--aspect", default="16:9", show_default=True, help="16:9, 9:16 or 1:1.")
@click.option("--frames", type=int, default=None, help="Video frames, 4k+1 (default: the preset's, 81 for real models).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "fp8"]), default="bf16",
              show_default=True, help="Weights and activations; norms, modulation and the head stay fp32. "
              "int8/fp8: calibrate the DiT into explicit Q/DQ (default observer; `turbotrt calibrate` has all options).")
@click.option("--attention", type=click.Choice(["sagesla", "sla", "dense"]), default="sagesla", show_default=True,
              help="Self-attention: SageSLA custom op (low-bit plugin in TensorRT), SLA (float plugin) or dense.")
@click.option("--sla-topk", type=float, default=None, help="Fraction of key blocks kept (default: preset's, 0.1).")
@click.option("--block-q", type=int, default=None, help="SLA query block (default: preset's, 128).")
@click.option("--block-k", type=int, default=None, help="SLA key block (default: preset's, 64).")
@click.option("--v-dtype", type=click.Choice(["fp8", "fp16"]), default="fp8", show_default=True,
              help="SageSLA V/P type: fp8 for sm89/sm90/sm120, fp16 for sm80.")
@click.option("--preset", default=None, help="Preset of a checkpoint whose shapes do not identify it.")
@click.option("--low-noise", type=click.Path(exists=True, dir_okay=False), default=None,
              help="I2V A14B: the low-noise expert's checkpoint (SOURCE is the high-noise one).")
@click.option("--text-encoder", "text_encoder", type=click.Path(exists=True, dir_okay=False), default=None,
              help="umT5 checkpoint (models_t5_umt5-xxl-enc-bf16.pth) to include.")
@click.option("--vae", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Wan VAE checkpoint (Wan2.1_VAE.pth) to include.")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), default=None,
              help="umT5 sentencepiece model (spiece.model) or tokenizer.json to ship in the bundle.")
@click.option("--seed", default=0, show_default=True, help="Seed of the tiny presets' weights and of validation inputs.")
@click.option("--validate/--no-validate", default=None,
              help="Compare ONNX Runtime with PyTorch (default: on for small models).")
@click.option("--target", default="auto", show_default=True,
              help="GPU target of the engines (auto = this machine's GPU, or sm_80/86/89/90/100/120). Engines are "
                   "built when TensorRT and that GPU are here; otherwise export stops after ONNX and says so.")
@click.option("--onnx-only", is_flag=True, help="Stop after ONNX (build engines later with `turbotrt build`).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def export(source, out, resolution, aspect, frames, precision, attention, sla_topk, block_q, block_k, v_dtype,
           preset, low_noise, text_encoder, vae, tokenizer, seed, validate, target, onnx_only, force):
    """Export SOURCE (a DiT checkpoint, or a tiny preset such as wan-tiny) to a bundle in --out.

    The bundle holds the DiT (each I2V expert), umT5 and the VAE step graphs as ONNX with external
    weights, the tokenizer and manifest.json (shapes, sampler, attention geometry, sha256 of every
    file). Self-attention becomes one turbodiffusion::SageSLA node per layer, carrying its reference math
    as an ONNX function (ONNX Runtime runs it; TensorRT swaps in the plugin). Weights stream from
    the checkpoint into external data, one tensor at a time."""
    _needs_torch()
    import shutil
    from pathlib import Path

    from tqdm import tqdm

    from turbotrt.export.api import ExportError, export as run
    from turbotrt.models.checkpoint import CheckpointError

    def bar(items):
        return tqdm(items, desc="  weights", unit="tensor", leave=False)

    if precision in ("int8", "fp8"):
        from turbotrt.calibration.api import calibrate

        if force and Path(out).exists():
            shutil.rmtree(out)
        try:
            report = calibrate(source, out, mode=precision, attention="sla" if attention == "dense" else attention,
                               text_encoder=text_encoder, tokenizer=tokenizer, log=click.echo, force=force)
        except (ValueError, RuntimeError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"calibrated {precision} bundle in {out}")
        return report
    try:
        result = run(source, out, resolution=resolution, frames=frames, aspect=aspect, precision=precision,
                     attention=attention, sla_topk=sla_topk, block_q=block_q, block_k=block_k, v_dtype=v_dtype,
                     preset=preset, low_noise=low_noise, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
                     seed=seed, validate=validate, force=force,
                     log=click.echo, progress=bar)
    except (ExportError, CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {', '.join(result.graphs)} to {result.out} in {result.seconds:.1f} s")
    if not result.passed:
        raise click.ClickException("validation failed: see the report above")
    if onnx_only:
        click.echo(f"engines: not built (--onnx-only); `turbotrt build {result.out} --target ...` builds them")
        return
    from turbotrt.export.engine import BuildError, BuildOptions, build_engines

    try:
        build_engines(result.out, BuildOptions(target=target), log=click.echo, verify=False)
    except BuildError as e:
        click.echo(f"engines: not built here ({e}).\nThe bundle is complete without them: run "
                   f"`turbotrt build {result.out} --target {target}` on the GPU machine.")


def _read_image(path):
    import av

    with av.open(str(path)) as src:
        return next(src.decode(video=0)).to_ndarray(format="rgb24")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="What the video shows.")
@click.option("--out", default="video.mp4", show_default=True, type=click.Path(dir_okay=False))
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4), help="rCM steps (1-4).")
@click.option("--seed", default=0, show_default=True)
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="I2V bundles: the first frame, at the bundle's resolution.")
@click.option("--ode", is_flag=True, help="Deterministic ODE sampling (I2V) instead of rCM's SDE steps.")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True,
              help="auto: TensorRT engines for this GPU when present, else ONNX Runtime (it says which).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the sha256 of every bundle file before loading (slow for large bundles).")
def run(bundle, prompt, out, steps, seed, image, ode, backend, verify):
    """Generate a video from BUNDLE with the lean runtime (no PyTorch)."""
    import time

    from turbotrt.bundle import BundleError
    from turbotrt.runtime.pipeline import Pipeline

    start = time.perf_counter()
    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend, verify=verify, log=click.echo)
        result = pipe(prompt, seed=seed, steps=steps, image=_read_image(image) if image else None, ode=ode)
    except (BundleError, RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    result.save(out)
    t, h, w, _ = result.frames.shape
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    click.echo(f"wrote {out}: {t} frames {w}x{h}, {steps} steps, seed {seed} ({time.perf_counter() - start:.1f} s; {stages})")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default="a red bird flies over a river at night", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def validate(bundle, prompt, seed, steps, json_out):
    """Check BUNDLE: each graph in ONNX Runtime against PyTorch (weights read from the bundle),
    TensorRT against ONNX Runtime where TensorRT is installed, and the runtime against the PyTorch
    reference pipeline end to end (same prompt and seed)."""
    _needs_torch()
    from dataclasses import asdict

    from turbotrt.bundle import BundleError
    from turbotrt.export.validate_bundle import validate_bundle

    try:
        result = validate_bundle(bundle, prompt=prompt, seed=seed, steps=steps, log=click.echo)
    except BundleError as e:
        raise click.ClickException(str(e)) from None
    if json_out:
        report = dict(graphs=[r.to_dict() for r in result.graphs], skipped=result.skipped,
                      end_to_end=result.end_to_end, passed=result.passed)
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if not result.passed:
        raise click.ClickException("validation failed")
    click.echo("bundle valid" + (f" ({len(result.skipped)} checks skipped)" if result.skipped else ""))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True)
def bench(bundle, steps, repeat, backend):
    """Per-stage latency of BUNDLE (text, each step, VAE; median of --repeat runs) and peak memory."""
    import resource
    import statistics
    import time

    from turbotrt.bundle import BundleError
    from turbotrt.runtime.pipeline import Pipeline

    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend, log=click.echo)
        start = time.perf_counter()
        pipe("warm-up", seed=0, steps=steps)
        click.echo(f"first run (loads every graph): {time.perf_counter() - start:.2f} s")
        runs = [pipe("a red bird flies over a river at night", seed=i, steps=steps).timings for i in range(repeat)]
    except (BundleError, RuntimeError, ValueError) as e:
        raise click.ClickException(str(e)) from None
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

    from turbotrt.runtime.gpu import gpus

    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception as e:  # a broken install is worth reporting, not crashing on
            return None if isinstance(e, ImportError) else f"broken ({e})"

    found = gpus()
    v = {m: version(m) for m in ("torch", "onnxruntime", "onnx", "tensorrt", "triton", "polygraphy")}
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
    click.echo(f"  SageSLA Triton kernels         {'yes' if v['triton'] and found else 'interpreter/PTX only (no GPU)' if v['triton'] else 'no: needs triton'}")


@main.command()
@click.option("--out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where the bundle and the video go.")
@click.option("--prompt", default="a red bird flies over a river at night", show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(out, prompt, seed):
    """Export the built-in tiny model into a bundle and generate a video from it on the CPU.

    Writes OUT/turbotrt-demo-bundle (ONNX graphs, tokenizer, manifest) and OUT/turbotrt-demo.mp4,
    running the bundle with ONNX Runtime and no PyTorch in the loop. The tiny model's weights are
    seeded random numbers, so the video is noise-like: it proves the pipeline, not a model."""
    _needs_torch()
    import resource
    import time
    from pathlib import Path

    from turbotrt.export.api import export as run_export
    from turbotrt.runtime.pipeline import Pipeline

    start = time.perf_counter()
    out = Path(out)
    bundle = out / "turbotrt-demo-bundle"
    result = run_export("wan-tiny", bundle, precision="fp32", attention="sagesla", force=True, log=click.echo)
    if not result.passed:
        raise click.ClickException("the exported graphs did not validate; see the reports above")
    pipe = Pipeline.from_bundle(bundle, backend="ort", log=click.echo)
    video = pipe(prompt, seed=seed, steps=4)
    path = video.save(out / "turbotrt-demo.mp4")
    t, h, w, _ = video.frames.shape
    click.echo(f"wrote {path}: {t} frames {w}x{h} from {bundle} in {time.perf_counter() - start:.1f} s "
               f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


@main.command()
@click.option("--preset", default="wan-tiny", show_default=True, help="A tiny preset (built-in seeded random weights).")
@click.option("--prompt", default="a red bird flies over a river at night", show_default=True)
@click.option("--out", default="turbotrt-reference.mp4", show_default=True, type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1, 4), help="rCM steps (1-4).")
@click.option("--frames", type=int, default=None, help="Video frames, 4k+1 (default: the preset's).")
def generate(preset, prompt, out, seed, steps, frames):
    """Generate a video with the PyTorch reference pipeline (umT5 -> DiT with rCM -> Wan VAE).

    Runs the built-in tiny presets on a CPU in seconds: their weights are random, so the video is
    noise-like; it proves the whole chain, not a model."""
    _needs_torch()
    import time

    from turbotrt.models.pipeline import generate as run

    if not preset.startswith("wan-tiny"):
        raise click.BadParameter("only the built-in tiny presets run here (wan-tiny, wan-tiny-i2v needs an image)",
                                 param_hint="--preset")
    start = time.perf_counter()
    try:
        video = run(preset, prompt, out, seed=seed, steps=steps, frames=frames)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    t, h, w, _ = video.frames.shape
    click.echo(f"wrote {out}: {t} frames {w}x{h} at {video.fps} fps, {steps} steps, seed {seed} "
               f"({time.perf_counter() - start:.1f} s)")


def _register_optional_commands():
    """Commands defined beside the code they drive; imported lazily by click only when listed."""
    from turbotrt.calibration.cli import calibrate_command
    from turbotrt.export.engine import build_command

    main.add_command(build_command, "build")
    main.add_command(calibrate_command, "calibrate")


_register_optional_commands()

if __name__ == "__main__":
    main()
