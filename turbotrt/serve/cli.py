"""`turbotrt serve`: a thin command over `turbotrt.serve.app.serve`.

Importing this module needs only click: Ray is imported when the command runs, so the command is
listed (and says how to install the extra) where Ray is not installed.
"""

from __future__ import annotations

import click

from turbotrt.serve import INSTALL_HINT


def _ray_missing() -> bool:
    try:
        import fastapi  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError:
        return True
    return False


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML settings: host, port, queue and results limits, and per-stage Ray Serve options "
                   "(replicas, autoscaling, ray_actor_options). Flags override it.")
@click.option("--host", default=None, help="HTTP address [127.0.0.1; 0.0.0.0 listens on every interface].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="HTTP port [8000].")
@click.option("--address", default=None,
              help="Ray cluster to join (HOST:6379 of `ray start --head`). Default: RAY_ADDRESS or the cluster "
                   "`ray start` began on this node, else a new local Ray instance that stops with the command.")
@click.option("--replicas", multiple=True, metavar="STAGE=N",
              help="Replicas of a stage: text_encoder, image_encoder, denoiser, decoder (repeatable) [1 each].")
@click.option("--gpus", multiple=True, metavar="STAGE=F",
              help="GPUs per replica of a stage, fractions share one (repeatable) [0: CPUs only].")
@click.option("--backend", type=click.Choice(["auto", "ort", "trt"]), default=None,
              help="Per replica: auto takes TensorRT engines for its GPU when present, else ONNX Runtime [auto].")
@click.option("--verify/--no-verify", default=None,
              help="Each replica checks the sha256 of the bundle's files when it loads [verify].")
@click.option("--queue-size", type=click.IntRange(1), default=None,
              help="Jobs queued or running at once; more answer 503 with Retry-After [32].")
@click.option("--jobs-dir", type=click.Path(file_okay=False), default=None,
              help="Where jobs and videos are kept, on the head node [<tmp>/turbotrt-serve/turbotrt].")
@click.option("--detach", is_flag=True,
              help="Deploy on a running cluster (--address, or `ray start`'s) and return; `serve delete APP` stops it.")
def serve_command(bundle, config_path, host, port, address, replicas, gpus, backend, verify, queue_size, jobs_dir,
                  detach):
    """Serve BUNDLE over HTTP on Ray Serve: each stage (text encoder, image encoder for I2V, DiT steps,
    VAE decode) is a deployment with its own replicas and GPUs.

    \b
    POST /v1/videos {"prompt": ..., "seed": 0, "steps": 4}  -> a job id
    GET  /v1/videos/ID             status, stage and step progress
    GET  /v1/videos/ID/content     the mp4
    POST /v1/videos/sync           the mp4 in the answer
    GET  /healthz, /docs           liveness; the OpenAPI schema

    Needs the `serve` extra: pip install 'turbotrt[serve]'."""
    if _ray_missing():
        raise click.ClickException(INSTALL_HINT)
    from turbotrt.serve.app import ServeError, serve
    from turbotrt.serve.config import ConfigError, apply, load_config, parse_assignments, set_stage

    try:
        config = load_config(config_path)
        flags = {k: v for k, v in dict(host=host, port=port, address=address, backend=backend, verify=verify,
                                        queue_size=queue_size, jobs_dir=jobs_dir).items() if v is not None}
        config = apply(config, flags, where="flags")
        for stage, n in parse_assignments(replicas, "--replicas", int).items():
            set_stage(config, stage, {"num_replicas": n}, "--replicas")
        for stage, f in parse_assignments(gpus, "--gpus", float).items():
            set_stage(config, stage, {"ray_actor_options": {"num_gpus": f}}, "--gpus")
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    try:
        serve(bundle, config, log=click.echo, block=not detach, start_ray=not detach,
              stage_flags=[a.partition("=")[0] for a in replicas + gpus])
    except ServeError as e:
        raise click.ClickException(str(e)) from None
    if detach:
        click.echo(f"left running on the cluster as app {config.app_name!r}; `serve status` shows it, "
                   f"`serve delete {config.app_name}` stops it")
