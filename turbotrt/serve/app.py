"""Deploy a bundle on Ray Serve: `serve(bundle, config)` is what `turbotrt serve` runs.

Ray Serve concepts used here (https://docs.ray.io/en/latest/serve/model_composition.html): one
deployment per stage, bound into the API deployment as deployment handles, so each stage has its
own replicas, autoscaling and `ray_actor_options` (GPUs per replica).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import defaultdict

import ray
from ray import serve as ray_serve

from turbotrt.core.errors import BundleError, TurbotrtError
from turbotrt.serve.api import HEAD_NODE, VideoAPI
from turbotrt.serve.config import ServeConfig
from turbotrt.serve.facts import BundleFacts
from turbotrt.serve.stages import STAGE_DEPLOYMENTS


class ServeError(TurbotrtError):
    """Why the service cannot start, in one line."""


def build_app(facts: BundleFacts, config: ServeConfig):
    """The Serve application: the stages this bundle needs, bound into the API."""
    stages = {stage: STAGE_DEPLOYMENTS[stage].options(**config.stage_options(stage)).bind(facts, config.backend,
                                                                                             config.verify)
              for stage in facts.stages}
    return VideoAPI.bind(facts, config, **stages)


def serve(bundle, config: ServeConfig, log=print, block: bool = True, start_ray: bool = True, stage_flags=()) -> str:
    """Deploy `bundle`; returns the base URL once every replica is up (with `block`, serves until Ctrl-C).

    Joins the Ray cluster at `config.address` (or RAY_ADDRESS, or the one `ray start` began on
    this node) or, with none and `start_ray`, starts a local Ray instance, which stops when this
    returns (with `block`) or when this process ends.
    `stage_flags`: stages named on the command line, which must exist in this bundle.
    """
    try:
        facts = BundleFacts.load(bundle, verify=config.verify)
    except BundleError as e:
        raise ServeError(str(e)) from None
    unused = [s for s in config.stages if s not in facts.stages]
    if any(s in unused for s in stage_flags):
        raise ServeError(f"{facts.name} is text-to-video: it has no image_encoder stage to configure")
    if any(config.stages[s] != ServeConfig().stages[s] for s in unused):
        log(f"note: the image_encoder settings are unused: {facts.name} is text-to-video")
    started = connect(config, log, start_ray)
    try:
        for note in check_resources(facts, config):
            log(f"note: {note}")
        try:
            start_http(config)
        except ray.exceptions.RayError as e:  # Serve's controller or proxy actor died starting
            raise ServeError(f"Ray Serve could not start its HTTP proxy ({type(e).__name__}: {_first_line(e)}); the "
                             f"logs under /tmp/ray/session_latest/logs/serve say why") from None
        log(f"deploying {facts.name} ({'image' if facts.i2v else 'text'}-to-video, {facts.width}x{facts.height}, "
            f"{facts.frames} frames) from {facts.path}")
        for stage in facts.stages:
            log(f"  {stage:14s} {config.replicas_text(stage)}")
        start = time.perf_counter()
        try:
            ray_serve.run(build_app(facts, config), name=config.app_name, route_prefix=config.route_prefix)
            described = {stage: describe(stage, config.app_name) for stage in facts.stages}
        except (RuntimeError, ray.exceptions.RayError) as e:  # RayError: an actor (replica, proxy) died starting
            raise ServeError(f"the deployment failed ({type(e).__name__}: {_first_line(e)}); `serve status` and the "
                             f"replicas' logs under /tmp/ray/session_latest/logs/serve say why") from None
        for stage in facts.stages:
            d = described[stage]
            gpus = f", GPU {','.join(d['gpus'])}" if d["gpus"] else ""
            log(f"  {stage:14s} up: {d['backend']} on {d['node']}{gpus}")
        url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        log(f"serving {facts.name} at {url} in {time.perf_counter() - start:.1f} s: POST {url}/v1/videos, "
            f"GET {url}/v1/videos/ID[/content], POST {url}/v1/videos/sync, {url}/healthz, {url}/docs")
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if not block:
        return url
    _interrupt_on_termination()
    try:
        log("Ctrl-C (or SIGTERM) stops the service")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log(f"stopping {config.app_name}")
    finally:
        if started:
            ray.shutdown()  # the local instance, Serve and every replica with it
        else:
            ray_serve.delete(config.app_name)  # our app only: the cluster is someone else's
    return url


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (service managers, a closed terminal) stop the service as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def connect(config: ServeConfig, log=print, start_ray: bool = True) -> bool:
    """Join a Ray cluster or start a local instance; True when this call started one."""
    if ray.is_initialized():
        return False
    if config.address:
        try:
            ray.init(address=config.address)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ServeError(f"cannot join the Ray cluster at {config.address}: {_first_line(e)} (a cluster begun by "
                             f"`ray start` checks a token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=`ray "
                             f"get-auth-token` of the head)") from None
        log(f"joined the Ray cluster at {config.address}: {_cluster_text()}")
        return False
    try:
        ray.init(address="auto")
        log(f"joined the running Ray cluster: {_cluster_text()}")
        return False
    except ConnectionError:
        if not start_ray:
            raise ServeError("no running Ray cluster to deploy on: `ray start --head` first, or pass --address") from None
        ray.init()
        log(f"started a local Ray instance: {_cluster_text()}")
        return True


def start_http(config: ServeConfig) -> None:
    """Start Serve's HTTP proxy, or check that the one running listens where the config says."""
    ray_serve.start(http_options={"host": config.host, "port": config.port})
    from ray.serve.context import _get_global_client  # the running proxy's options (Serve keeps the first ones)

    http = _get_global_client().http_config
    if (http.host, http.port) != (config.host, config.port):
        raise ServeError(f"Ray Serve already runs on this cluster with HTTP at {http.host}:{http.port}, not "
                         f"{config.host}:{config.port}: serve there (--host {http.host} --port {http.port}) or stop it "
                         f"(`serve shutdown`)")


def check_resources(facts: BundleFacts, config: ServeConfig) -> list[str]:
    """Refuse, in one line, a deployment the cluster cannot place (Serve would wait for it forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total: dict[str, float] = defaultdict(float)
    for res in nodes:
        for k, v in res.items():
            total[k] += v
    need: dict[str, float] = defaultdict(float)
    asks: dict[str, list[str]] = defaultdict(list)
    for stage in facts.stages:
        o = config.stages[stage]
        scaling = o.get("autoscaling_config") or {}
        count = o.get("num_replicas") or max(scaling.get("min_replicas", 1), scaling.get("initial_replicas") or 0)
        actor = o.get("ray_actor_options", {})
        per = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
        for name, amount in per.items():
            if not amount:
                continue
            if not any(res.get(name, 0) >= amount for res in nodes):
                raise ServeError(f"{stage} asks for {amount:g} {name} per replica; no node of the Ray cluster has that "
                                 f"many (nodes have {', '.join(f'{r.get(name, 0):g}' for r in nodes)})")
            need[name] += count * amount
            asks[name].append(f"{stage} {count}x{amount:g}")
    for name, amount in need.items():
        if amount > total.get(name, 0) + 1e-9:
            raise ServeError(f"the stages ask for {amount:g} {name} ({', '.join(asks[name])}); the Ray cluster has "
                             f"{total.get(name, 0):g}: give fewer replicas or smaller ray_actor_options, or add nodes")
    if HEAD_NODE not in total:
        raise ServeError("the Ray cluster has no head node resource for the API replica")
    notes = []
    if total.get("GPU", 0) and not need.get("GPU"):
        notes.append(f"the cluster has {total['GPU']:g} GPUs but no stage asks for one, so every stage runs on CPUs: "
                     f"--gpus denoiser=1 (and the other stages) gives them GPUs")
    return notes


def describe(stage: str, app_name: str) -> dict:
    """What one replica of `stage` runs on (backend, node, GPUs)."""
    handle = ray_serve.get_deployment_handle(STAGE_DEPLOYMENTS[stage].name, app_name=app_name)
    return handle.describe.remote().result(timeout_s=120)


def _cluster_text() -> str:
    res = ray.cluster_resources()
    nodes = sum(n["Alive"] for n in ray.nodes())
    return f"{nodes} node{'s' if nodes != 1 else ''}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
