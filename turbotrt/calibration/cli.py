"""`turbotrt calibrate`: the click command over `turbotrt.calibration.api.calibrate`.

torch and the calibration code load inside the command, so building the CLI stays cheap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from turbotrt.calibration.config import MODES, OBSERVERS


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    def bar(items, desc: str = ""):
        return tqdm(items, desc=f"  {desc}", leave=False, file=sys.stderr)

    return bar


def _prompts(prompts: tuple[str, ...], prompts_file: str | None) -> tuple[str, ...] | None:
    found = list(prompts)
    if prompts_file:
        found += [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    return tuple(found) or None


@click.command("calibrate")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder of the quantized bundle.")
@click.option("--mode", type=click.Choice(MODES), default="int8", show_default=True,
              help="int8: activations per tensor, weights per output channel; fp8: e4m3, both per tensor.")
@click.option("--observer", type=click.Choice(OBSERVERS), default=None,
              help="How activation ranges are chosen [default: percentile for int8, max for fp8].")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="Kept share of |x| (%), percentile observer.")
@click.option("--smoothquant", "alpha", type=float, default=None, help="SmoothQuant alpha in [0, 1] (off by default).")
@click.option("--prompt", "prompts", multiple=True, help="A calibration prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="One calibration prompt per line.")
@click.option("--embeddings", type=click.Path(exists=True, dir_okay=False),
              help="Precomputed T5 embeddings (.npy/.safetensors, [N, text_len, text_dim]) instead of prompts.")
@click.option("--text-encoder", type=click.Path(exists=True, dir_okay=False), help="umT5 checkpoint to encode prompts.")
@click.option("--tokenizer", type=click.Path(exists=True), help="Tokenizer of the umT5 checkpoint.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="A TurboDiffusion -quant checkpoint: start from its int8 weights.")
@click.option("--steps", type=click.IntRange(1, 4), default=4, show_default=True, help="rCM steps of the trajectories.")
@click.option("--seed", "seeds", type=click.IntRange(min=0), multiple=True, help="Noise seed of a trajectory (repeatable).")
@click.option("--eval-seed", "eval_seeds", type=click.IntRange(min=0), multiple=True,
              help="Seeds of the quality report [default: one past the calibration seeds].")
@click.option("--exclude", multiple=True, help="Keep Linears matching this pattern in float, e.g. 'blocks.0.*'.")
@click.option("--cache", type=click.Path(exists=True, dir_okay=False), help="Reuse a calibration cache (same settings).")
@click.option("--attention", type=click.Choice(["dense", "sla", "sagesla"]), default="sla", show_default=True,
              help="Attention of the float export, when SOURCE is a preset or checkpoint.")
@click.option("--device", default="cpu", show_default=True, help="Where the PyTorch models run, e.g. cuda.")
@click.option("--no-eval", is_flag=True, help="Skip the quality report's measurements.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def calibrate_command(source, out, mode, observer, percentile, alpha, prompts, prompts_file, embeddings, text_encoder,
                      tokenizer, checkpoint, steps, seeds, eval_seeds, exclude, cache, attention, device, no_eval,
                      no_progress, force, as_json):
    """Calibrate the DiT of SOURCE (an exported bundle folder, a tiny preset or a checkpoint) to INT8 or
    FP8 and write a bundle whose graph carries explicit Q/DQ for TensorRT, plus its calibration cache
    and a quality report (per rCM step and final latent, ONNX Runtime and PyTorch vs float)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException("calibration needs PyTorch: pip install 'turbotrt[export]'") from None
    from turbotrt.calibration.api import CalibrationError, calibrate
    from turbotrt.calibration.cache import CacheError
    from turbotrt.calibration.config import QuantConfigError

    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    try:
        report = calibrate(
            source, out, mode=mode, observer=observer, percentile=percentile, smoothquant=alpha,
            prompts=_prompts(prompts, prompts_file), steps=steps, seeds=seeds or (0,), exclude=exclude,
            embeddings=embeddings, checkpoint=checkpoint, text_encoder=text_encoder, tokenizer=tokenizer,
            cache=cache, eval_seeds=eval_seeds or None, attention=attention, evaluate=not no_eval, device=device, force=force,
            log=log, progress=_progress_bar(not no_progress and not as_json),
        )
    except (CalibrationError, CacheError, QuantConfigError, ValueError, FileNotFoundError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
