"""The service's settings: defaults, then a YAML file (`--config`), then command-line flags.

    host: 127.0.0.1            # HTTP address of Serve's proxy (0.0.0.0 to listen on every interface)
    port: 8000
    backend: auto              # per replica: TensorRT engines for its GPU when present, else ONNX Runtime
    stages:
      denoiser:                # any of text_encoder, image_encoder (I2V), denoiser, decoder
        num_replicas: 2        # or autoscaling_config: {min_replicas: 1, max_replicas: 4}
        ray_actor_options: {num_gpus: 1}

Stage settings are Ray Serve deployment options, passed through as written (Ray checks them):
https://docs.ray.io/en/latest/serve/api/doc/ray.serve.deployment_decorator.html
Unknown keys are errors, not ignored.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("text_encoder", "image_encoder", "denoiser", "decoder")
STAGE_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "ray_actor_options",
              "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s")
# A replica runs one request at a time: a graph on a GPU (or all CPU cores) is busy with it anyway.
# ONNX Runtime uses every core whatever num_cpus says; num_cpus only tells Ray's scheduler.
DEFAULT_STAGE = {"num_replicas": 1, "max_ongoing_requests": 1, "ray_actor_options": {"num_cpus": 0.5}}


class ConfigError(ValueError):
    pass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "turbotrt"
    address: str | None = None  # Ray cluster to join; None: RAY_ADDRESS or `ray start` on this node, else a new local one
    backend: str = "auto"
    verify: bool = True  # each replica checks the sha256 of the bundle's files when it loads
    queue_size: int = 32  # jobs queued or running at once; past that, 503 with Retry-After
    max_results: int = 64  # finished jobs kept at once (until deleted or expired); past that, 503
    result_ttl_s: float = 3600.0  # how long a finished job (its video or its error) is kept
    job_timeout_s: float = 3600.0  # a job still unfinished after this fails
    sync_timeout_s: float = 600.0  # POST /v1/videos/sync waits this long, then answers 504 with the job id
    stage_retries: int = 2  # calls of a stage retried after its replica died
    max_image_bytes: int = 20_000_000
    jobs_dir: str | None = None  # on the head node; default: <tmp>/turbotrt-serve/<app_name>
    stages: dict = field(default_factory=lambda: {s: copy.deepcopy(DEFAULT_STAGE) for s in STAGES})

    @property
    def jobs_path(self) -> Path:
        return Path(self.jobs_dir) if self.jobs_dir else Path(tempfile.gettempdir()) / "turbotrt-serve" / self.app_name

    def stage_options(self, stage: str) -> dict:
        """Ray Serve deployment options of one stage."""
        return copy.deepcopy(self.stages[stage])

    def replicas_text(self, stage: str) -> str:
        o = self.stages[stage]
        if "autoscaling_config" in o:
            a = o["autoscaling_config"]
            count = f"{a.get('min_replicas', 1)}-{a.get('max_replicas', 1)} replicas (autoscaling)"
        else:
            count = f"{o.get('num_replicas', 1)} replica{'s' if o.get('num_replicas', 1) != 1 else ''}"
        actor = o.get("ray_actor_options", {})
        res = ", ".join(f"{k} {actor[k]}" for k in ("num_gpus", "num_cpus") if actor.get(k))
        return f"{count}" + (f", {res} each" if res else "")


_TYPES = {"host": str, "port": int, "route_prefix": str, "app_name": str, "address": (str, type(None)),
          "backend": str, "verify": bool, "queue_size": int, "max_results": int, "result_ttl_s": (int, float),
          "job_timeout_s": (int, float), "sync_timeout_s": (int, float), "stage_retries": int,
          "max_image_bytes": int, "jobs_dir": (str, type(None)), "stages": dict}
_POSITIVE = ("port", "queue_size", "max_results", "result_ttl_s", "job_timeout_s", "sync_timeout_s", "max_image_bytes")


def load_config(path: str | os.PathLike | None) -> ServeConfig:
    """Defaults, overlaid with the YAML file at `path` (when given)."""
    config = ServeConfig()
    if path is None:
        return config
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return apply(config, data, where=str(path))


def apply(config: ServeConfig, data: dict, where: str = "config") -> ServeConfig:
    """A copy of `config` with `data`'s settings; stage settings merge into the defaults."""
    config = copy.deepcopy(config)
    for key, value in data.items():
        if key not in _TYPES:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(_TYPES)})")
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and _TYPES[key] is not bool):
            raise ConfigError(f"{where}: {key} must be {_type_name(_TYPES[key])}, got {value!r}")
        if key == "stages":
            for stage, options in value.items():
                set_stage(config, stage, options, where)
        else:
            setattr(config, key, value)
    check(config, where)
    return config


def set_stage(config: ServeConfig, stage: str, options: dict, where: str = "config") -> None:
    if stage not in STAGES:
        raise ConfigError(f"{where}: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: stages.{stage} must be a mapping of deployment options, got {options!r}")
    unknown = [k for k in options if k not in STAGE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: stages.{stage}: unknown option {unknown[0]!r} (known: {', '.join(STAGE_KEYS)})")
    merged = config.stages[stage]
    for k, v in options.items():
        if k == "ray_actor_options":
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: stages.{stage}.ray_actor_options must be a mapping, got {v!r}")
            merged.setdefault(k, {}).update(v)
        else:
            merged[k] = v
    if "autoscaling_config" in options and "num_replicas" not in options:
        merged.pop("num_replicas", None)  # the default count would conflict with autoscaling
    if "num_replicas" in options and "autoscaling_config" not in options:
        merged.pop("autoscaling_config", None)
    if "num_replicas" in merged and "autoscaling_config" in merged:
        raise ConfigError(f"{where}: stages.{stage}: give num_replicas or autoscaling_config, not both")


def check(config: ServeConfig, where: str = "config") -> None:
    for key in _POSITIVE:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {getattr(config, key)}")
    if config.stage_retries < 0:
        raise ConfigError(f"{where}: stage_retries must be 0 or more, got {config.stage_retries}")
    if config.backend not in ("auto", "ort", "trt"):
        raise ConfigError(f"{where}: backend must be auto, ort or trt, got {config.backend!r}")
    if not config.route_prefix.startswith("/"):
        raise ConfigError(f"{where}: route_prefix must start with '/', got {config.route_prefix!r}")


def parse_assignments(values: tuple[str, ...], what: str, kind) -> dict[str, float]:
    """`("denoiser=2", "decoder=1")` -> {"denoiser": 2, "decoder": 1}, for --replicas and --gpus."""
    out = {}
    for item in values:
        stage, sep, number = item.partition("=")
        if not sep or stage not in STAGES:
            raise ConfigError(f"{what} takes STAGE=NUMBER with a stage of {', '.join(STAGES)}; got {item!r}")
        try:
            out[stage] = kind(number)
        except ValueError:
            raise ConfigError(f"{what} {item!r}: {number!r} is not a{'n integer' if kind is int else ' number'}") from None
        if out[stage] < 0 or (what == "--replicas" and out[stage] == 0):
            raise ConfigError(f"{what} {item!r}: must be {'at least 1' if what == '--replicas' else '0 or more'}")
    return out


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
             type(None): "null"}
    if t == (int, float):
        return "a number"
    return " or ".join(names[x] for x in t) if isinstance(t, tuple) else names[t]
