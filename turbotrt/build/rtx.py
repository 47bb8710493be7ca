"""TensorRT for RTX engines: built on any machine, GPU or not, for RTX-class GPUs.

TensorRT for RTX (`pip install 'turbotrt[rtx]'`, module `tensorrt_rtx`) parses a bundle's ONNX graphs
and builds engines without a GPU: its builder compiles a portable program for the target compute
capabilities named in the builder config, and the GPU that loads the engine finishes it (running
still needs one). Differences from standard TensorRT that shape this module:
- no plugins: the `turbodiffusion::SageSLA` node is inlined from its ONNX function body, the
  gather-based float sparse core, whose cost follows the kept blocks (not L^2) but which computes
  in the graph's float type (no INT8/FP8 attention); the manifest records it (`function-body`);
- targets sm_80, sm_86, sm_89, sm_120, sm_121 (RTX-class; no sm_90/sm_100; sm_75 has no FP32
  GEMM in TensorRT for RTX); FP8 Q/DQ only on sm_89 and newer, which the plan checks first;
- always strongly typed; timing caches are no-ops; hardware- and version-compatibility, refit and
  weight stripping are not offered (the last two need a GPU at build time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from turbotrt.build.plan import BuildError, read_graph
from turbotrt.core.bundle import Bundle, forget_missing_engines
from turbotrt.core.errors import MissingDependencyError
from turbotrt.core.files import write_atomic
from turbotrt.core.gpu import compute_capability
from turbotrt.core.manifest import EngineEntry

FLAVOUR = "tensorrt-rtx"
TARGETS = ("sm_80", "sm_86", "sm_89", "sm_120", "sm_121")
FP8_TARGETS = ("sm_89", "sm_120", "sm_121")
INSTALL = "pip install 'turbotrt[rtx]'"
HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class RtxOptions:
    targets: tuple[str, ...] = ("auto",)  # compute capabilities; "auto": this machine's GPU
    networks: tuple[str, ...] | None = None  # None: every network of the bundle
    workspace_gib: float | None = None
    optimization_level: int | None = None  # 0..5; None: the builder's default (3)
    tf32: bool = False  # TensorRT for RTX allows TF32 by default; fp32 graphs keep IEEE fp32 unless asked

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(dict.fromkeys(self.targets))
        bad = [t for t in targets if t != "auto" and t not in TARGETS]
        if not targets or bad:
            raise ValueError(f"unsupported TensorRT for RTX target {', '.join(bad) or '(none)'}; use 'auto' (this "
                             f"machine's GPU) or {', '.join(TARGETS)} (sm_75 has no FP32 GEMM in TensorRT for RTX; "
                             "sm_90/sm_100 are not RTX targets: use --runtime tensorrt)")
        object.__setattr__(self, "targets", targets)
        if self.networks is not None:
            object.__setattr__(self, "networks", tuple(dict.fromkeys(self.networks)))
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise ValueError(f"workspace must be a positive number of GiB, got {self.workspace_gib!r}")
        level = self.optimization_level
        if level is not None and (type(level) is not int or not 0 <= level <= 5):
            raise ValueError(f"builder optimization level must be an int in 0..5, got {level!r}")

    def resolved_targets(self) -> tuple[str, ...]:
        out = []
        for t in self.targets:
            if t == "auto":
                t = compute_capability()
                if t is None:
                    raise BuildError("target 'auto' means this machine's GPU, and there is none: name the GPUs "
                                     f"the engines are for with --target ({', '.join(TARGETS)}); TensorRT for "
                                     "RTX builds without one")
                if t not in TARGETS:
                    raise BuildError(f"this machine's GPU is {t}, not a TensorRT for RTX target ({', '.join(TARGETS)})")
            out.append(t)
        return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class RtxNetwork:
    network: str
    onnx: str  # relative to the bundle
    external_data: str | None
    target: str
    engine: str  # engines/tensorrt-rtx/<target>/<network>.plan
    attention: str  # "function-body" when the graph has SageSLA nodes, else "none"
    sagesla_nodes: int
    fp8: bool


@dataclass(frozen=True)
class RtxPlan:
    bundle: Path
    targets: tuple[str, ...]
    version: str | None
    options: RtxOptions
    networks: tuple[RtxNetwork, ...]
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_json(self) -> str:
        d = dict(runtime=FLAVOUR, bundle=str(self.bundle), targets=list(self.targets), version=self.version,
                 options=asdict(self.options), networks=[asdict(n) for n in self.networks],
                 problems=list(self.problems), warnings=list(self.warnings))
        return json.dumps(d, indent=2) + "\n"


def installed_version() -> str | None:
    try:
        import tensorrt_rtx
    except Exception:  # not installed, or its libraries fail to load
        return None
    return tensorrt_rtx.__version__


def plan_rtx(bundle: Bundle, options: RtxOptions) -> RtxPlan:
    """What TensorRT for RTX will be asked to build, per network and target (no TensorRT needed)."""
    targets = options.resolved_targets()
    names = list(options.networks) if options.networks is not None else bundle.networks
    unknown = [n for n in names if n not in bundle.networks]
    if unknown:
        raise ValueError(f"{bundle.root} has no network {', '.join(unknown)}; it has {', '.join(bundle.networks)}")
    problems, warnings, networks = [], [], []
    for name in names:
        path, data = bundle.graph(name), bundle.data(name)
        graph = read_graph(path, data.name if data else None)
        nodes = len(graph["sagesla"])
        others = [op for op in graph["custom_ops"] if op != "turbodiffusion::SageSLA"]
        if others:
            problems.append(f"{name}: custom ops {', '.join(others)} have no plugin in TensorRT for RTX")
        if nodes:
            warnings.append(f"{name}: TensorRT for RTX has no plugins, so its {nodes} SageSLA nodes run as their ONNX "
                            "function body: the gather-based float sparse core (cost follows the kept blocks, in the "
                            "graph's float type; no INT8/FP8 attention)")
        for target in targets:
            if graph["fp8"] and target not in FP8_TARGETS:
                problems.append(f"{name}: FP8 Q/DQ needs sm_89 or newer; {target} has no FP8 (build this bundle for "
                                f"{', '.join(FP8_TARGETS)}, or calibrate with --mode int8 for {target})")
            networks.append(RtxNetwork(
                network=name, onnx=path.relative_to(bundle.root).as_posix(),
                external_data=data.relative_to(bundle.root).as_posix() if data else None, target=target,
                engine=f"engines/{FLAVOUR}/{target}/{name}.plan", attention="function-body" if nodes else "none",
                sagesla_nodes=nodes, fp8=graph["fp8"]))
    return RtxPlan(bundle.root.resolve(), targets, installed_version(), options, tuple(networks), tuple(problems),
                   tuple(warnings))


def import_rtx():
    try:
        import tensorrt_rtx
    except ImportError as e:
        raise MissingDependencyError(f"building TensorRT for RTX engines needs the `tensorrt_rtx` package ({e}): "
                                     f"{INSTALL}") from None
    return tensorrt_rtx


def _one_line(message) -> str:
    """TensorRT's multi-line messages as one line, without the CUDA-driver noise of a GPU-less machine."""
    lines = [x.strip() for x in str(message).splitlines() if x.strip() and "cudaError 35" not in x]
    return " / ".join(lines)


def _logger(trt, log):
    """TensorRT's messages to our log, warnings and up; errors are kept for the one-line failure
    (the builder reports why it failed only through its logger)."""

    class Forward(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            msg = str(msg).strip()
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(_one_line(msg))
            elif severity <= trt.ILogger.Severity.WARNING and "already exists" not in msg:
                # (inlined function bodies repeat their node names: harmless, and said once per node)
                log(f"  tensorrt-rtx: {msg}")

    return Forward()


@contextlib.contextmanager
def heartbeat(log, what: str, every: float = HEARTBEAT_S):
    """Say every `every` seconds that `what` is still running (a 1.3B build takes minutes)."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat():
        while not stop.wait(every):
            log(f"  ... still {what} ({time.perf_counter() - start:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def build_plan_bytes(graph: str | os.PathLike, targets: Iterable[str], options: RtxOptions = RtxOptions(("sm_89",)),
                     log: Callable[[str], None] = print) -> bytes:
    """Parse one ONNX graph and build a serialized engine for `targets` (one plan may hold several)."""
    trt = import_rtx()
    logger = _logger(trt, log)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # From the file, not bytes: the parser finds the external weights beside the graph.
    if not parser.parse_from_file(str(graph)):
        errors = [_one_line(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise BuildError(f"TensorRT for RTX cannot parse {Path(graph).name}: {'; '.join(errors[:3]) or 'no reason given'}")
    config = builder.create_builder_config()
    targets = list(targets)
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        config.set_compute_capability(getattr(trt.ComputeCapability, t.replace("sm_", "SM")), i)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 graphs keep the precision validation held them to
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise BuildError(f"TensorRT for RTX could not build {Path(graph).name} for {', '.join(targets)}: "
                         f"{'; '.join(logger.errors[-3:]) or 'see its log above'}")
    return bytes(memoryview(data))


@dataclass
class RtxResult:
    plan: RtxPlan
    engines: dict[tuple[str, str], EngineEntry] = field(default_factory=dict)  # (network, target) -> entry
    seconds: float = 0.0


def build_rtx_engines(bundle_dir: str | os.PathLike, options: RtxOptions, log: Callable[[str], None] = print,
                      verify: bool = True, plan_out: str | os.PathLike | None = None) -> RtxResult:
    """Build `engines/tensorrt-rtx/<target>/<network>.plan` for every network and target, record each
    engine in the manifest (atomically, as it is made). Needs `tensorrt_rtx`, not a GPU."""
    start = time.perf_counter()
    trt = import_rtx()
    gone = forget_missing_engines(bundle_dir)
    if gone:
        log(f"forgot {len(gone)} deleted engine file(s): {', '.join(gone)}")
    bundle = Bundle.load(bundle_dir, verify=verify)
    plan = plan_rtx(bundle, options)
    if plan_out is not None:
        Path(plan_out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(plan_out), plan.to_json())
    for w in plan.warnings:
        log(f"note: {w}")
    if plan.problems:
        raise BuildError("the build plan has problems:\n  - " + "\n  - ".join(plan.problems))
    result = RtxResult(plan)
    for net in plan.networks:
        log(f"[{net.network}] building {net.engine} for {net.target} with TensorRT for RTX {trt.__version__}"
            + (" (SageSLA as its function body)" if net.attention == "function-body" else ""))
        t0 = time.perf_counter()
        with heartbeat(log, f"building {net.network} for {net.target}"):
            data = build_plan_bytes(bundle.checked_graph(net.network), [net.target], options, log)
        entry = EngineEntry(
            file=net.engine, flavour=FLAVOUR, target=net.target, library_version=trt.__version__,
            sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), attention=net.attention,
            details=dict(profile=bundle.profile.name, sagesla_nodes=net.sagesla_nodes, fp8=net.fp8,
                         tf32=options.tf32, built_on_gpu=compute_capability()),
        )
        bundle.record_engine(net.network, entry, data)
        result.engines[(net.network, net.target)] = entry
        log(f"[{net.network}] wrote {net.engine} ({len(data) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    result.seconds = time.perf_counter() - start
    return result
