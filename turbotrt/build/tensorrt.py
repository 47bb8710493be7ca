"""Standard TensorRT engines: Polygraphy loaders generated from a build plan, and the build itself.

TensorRT is imported only when an engine is built; SageSLA nodes become the plugin's ahead-of-time
kernel (its PTX embedded in the engine, which then runs from plain libnvinfer without Python).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from turbotrt.build.plan import MIN_TENSORRT, BuildError, BuildOptions, BuildPlan, NetworkPlan, plan_build
from turbotrt.core.bundle import Bundle, forget_missing_engines
from turbotrt.core.files import write_atomic
from turbotrt.core.gpu import compute_capability
from turbotrt.core.manifest import EngineEntry

# --- Polygraphy loaders -------------------------------------------------------------------------------

def _polygraphy():
    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, PostprocessConfig, Profile
    except ImportError as e:
        raise BuildError(f"building engines needs Polygraphy (pip install polygraphy): {e}") from None
    return CreateConfig, EngineBytesFromNetwork, PostprocessConfig, Profile


def _enum(enum, name: str, what: str):
    try:
        return getattr(enum, name)
    except AttributeError:
        raise BuildError(f"this TensorRT has no {what} {name}; TensorRT >= "
                         f"{'.'.join(map(str, MIN_TENSORRT))} is required") from None


def network_flags_mask(flags: Iterable[str], trt) -> int:
    mask = 0
    for name in flags:
        # Networks are always strongly typed from TensorRT 11, which deprecates the flag.
        if name == "STRONGLY_TYPED" and _trt_version(trt) >= (11, 0):
            continue
        mask |= 1 << int(_enum(trt.NetworkDefinitionCreationFlag, name, "network flag"))
    return mask


def parser_flags_mask(flags: Iterable[str], trt) -> int:
    mask = 0
    for name in flags:
        mask |= 1 << int(_enum(trt.OnnxParserFlag, name, "ONNX parser flag"))
    return mask


def _trt_version(trt) -> tuple[int, int]:
    major, minor = (trt.__version__.split(".") + ["0"])[:2]
    return int(major), int(minor)


class NetworkFromOnnxFile:
    """Polygraphy-style loader: parses an ONNX file into (builder, network, parser) when called.

    Polygraphy's NetworkFromOnnxPath sets only the strongly-typed creation flag; graphs with SageSLA
    also need PREFER_AOT_PYTHON_PLUGINS, which TensorRT takes only when the network is created.
    """

    def __init__(self, path: str | os.PathLike, network_flags: Iterable[str] = ("STRONGLY_TYPED",),
                 parser_flags: Iterable[str] = ("NATIVE_INSTANCENORM",)):
        self.path, self.network_flags, self.parser_flags = str(path), tuple(network_flags), tuple(parser_flags)

    def __call__(self):
        import tensorrt as trt
        from polygraphy.backend.trt import util as trt_util

        logger = trt_util.get_trt_logger()
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags_mask(self.network_flags, trt))
        trt.init_libnvinfer_plugins(logger, "")
        parser = trt.OnnxParser(network, logger)
        parser.flags = parser_flags_mask(self.parser_flags, trt)
        # From the file, not bytes: the parser finds the external weights next to the graph.
        ok = parser.parse_from_file(self.path)
        trt_util.check_onnx_parser_errors(parser, ok)
        return builder, network, parser


def network_loader(net: NetworkPlan, root: Path) -> NetworkFromOnnxFile:
    return NetworkFromOnnxFile(root / net.onnx, net.network_flags, net.parser_flags)


def create_config_kwargs(net: NetworkPlan, trt) -> dict:
    """Arguments of Polygraphy's CreateConfig for one network's plan, with names resolved in `trt`."""
    Profile = _polygraphy()[3]
    cfg = net.config
    profile = Profile()
    for name, shape in net.shapes.items():
        profile.add(name, min=shape, opt=shape, max=shape)
    kwargs = dict(
        profiles=[profile],
        tf32=cfg["tf32"],
        memory_pool_limits={_enum(trt.MemoryPoolType, k, "memory pool"): v
                            for k, v in cfg["memory_pool_limits"].items()} or None,
        builder_optimization_level=cfg["builder_optimization_level"],
        version_compatible=cfg["version_compatible"] or None,
        refittable=cfg["refittable"],
        strip_plan=cfg["strip_plan"],
        load_timing_cache=cfg["timing_cache"],
    )
    level = cfg["hardware_compatibility_level"]
    if level != "NONE":
        kwargs["hardware_compatibility_level"] = _enum(trt.HardwareCompatibilityLevel, level, "hardware compatibility")
    return kwargs


def config_loader(net: NetworkPlan, trt):
    """Polygraphy's CreateConfig for one network's plan, plus the builder flags it has no argument for."""
    CreateConfig, _, PostprocessConfig, _ = _polygraphy()
    config = CreateConfig(**create_config_kwargs(net, trt))
    extra = [_enum(trt.BuilderFlag, f, "builder flag") for f in net.config["extra_builder_flags"]]
    if not extra:
        return config

    def set_flags(builder, network, cfg):
        for flag in extra:
            cfg.set_flag(flag)

    return PostprocessConfig(config, set_flags)


def engine_loader(net: NetworkPlan, root: Path, trt):
    """A Polygraphy loader of the serialized engine; it also updates the timing cache."""
    EngineBytesFromNetwork = _polygraphy()[1]
    cache = net.config["timing_cache"]
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    return EngineBytesFromNetwork(network_loader(net, root), config=config_loader(net, trt), save_timing_cache=cache)


def _engine_bytes(net: NetworkPlan, root: Path, trt):
    return engine_loader(net, root, trt)()


# --- building -----------------------------------------------------------------------------------------

def _import_tensorrt():
    import tensorrt as trt

    return trt


def _requirements() -> tuple[object | None, str | None, list[str]]:
    """(tensorrt module or None, GPU compute capability or None, what is missing)."""
    missing = []
    try:
        trt = _import_tensorrt()
    except Exception as e:  # ImportError, or an installed package whose libraries fail to load
        trt = None
        missing.append(f"the `tensorrt` Python package, TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} "
                       f"(import failed: {e})")
    else:
        if _trt_version(trt) < MIN_TENSORRT:
            missing.append(f"TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} (this is {trt.__version__})")
    gpu = compute_capability()
    if gpu is None:
        missing.append("an NVIDIA GPU (nvidia-smi finds none)")
    return trt, gpu, missing


@dataclass
class BuildResult:
    plan: BuildPlan
    engines: dict[str, EngineEntry] = field(default_factory=dict)  # network -> manifest engine entry
    seconds: float = 0.0


def build_engines(bundle_dir: str | os.PathLike, options: BuildOptions, log: Callable[[str], None] = print,
                  verify: bool = True, plan_out: str | os.PathLike | None = None) -> BuildResult:
    """Build the engines of `options.networks` (all by default) on this machine's GPU, save them under
    `engines/tensorrt/<target>/` and record them in the bundle's manifest (atomically, after each engine).

    verify: check the sha256 of the bundle's files first (off saves a read of the weights).
    plan_out: also write the plan that was built to this file.
    """
    start = time.perf_counter()
    trt, gpu, missing = _requirements()
    if missing:
        raise BuildError("building TensorRT engines needs " + " and ".join(missing) + ". The plan does not: "
                         "`turbotrt build BUNDLE --dry-run --target sm_XX` writes what the build would ask "
                         "TensorRT for, on any machine")
    if options.tensorrt_version and options.tensorrt_version != trt.__version__:
        raise BuildError(f"--tensorrt-version {options.tensorrt_version} was given, but this TensorRT is "
                         f"{trt.__version__}; engines are built by the installed one")
    gone = forget_missing_engines(bundle_dir)
    if gone:
        log(f"forgot {len(gone)} deleted engine file(s): {', '.join(gone)}")
    bundle = Bundle.load(bundle_dir, verify=verify)
    plan = plan_build(bundle, options, gpu=gpu, tensorrt_version=trt.__version__)
    if plan_out is not None:
        Path(plan_out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(plan_out), plan.to_json())
    for w in plan.warnings:
        log(f"warning: {w}")
    if plan.problems:
        raise BuildError("the build plan has problems:\n  - " + "\n  - ".join(plan.problems))
    if any(n.uses_plugins for n in plan.networks):
        from turbotrt.plugins.trt import register_plugins

        register_plugins()  # before parsing: the parser looks SageSLA up in the plugin registry
    result = BuildResult(plan)
    for net in plan.networks:
        log(f"[{net.network}] building {net.engine} for {plan.target} with TensorRT {trt.__version__} "
            f"(profile {net.profile_name}{', SageSLA AOT plugin' if net.uses_plugins else ''})")
        t0 = time.perf_counter()
        data = _engine_bytes(net, bundle.root, trt)
        if data is None:
            raise BuildError(f"{net.network}: TensorRT returned no engine; see its log above")
        view = memoryview(data)
        entry = engine_entry(plan, net, hashlib.sha256(view).hexdigest(), view.nbytes)
        bundle.record_engine(net.network, entry, view)
        result.engines[net.network] = entry
        log(f"[{net.network}] wrote {net.engine} ({view.nbytes / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    result.seconds = time.perf_counter() - start
    return result


def engine_entry(plan: BuildPlan, net: NetworkPlan, sha256: str, size: int) -> EngineEntry:
    """The manifest's record of one built engine (what `Bundle.engine` matches on, and what was asked)."""
    ptx = [p.ptx_sha256 for p in net.plugins]
    return EngineEntry(
        file=net.engine, flavour="tensorrt", target=plan.target, library_version=plan.tensorrt_version,
        sha256=sha256, bytes=size, attention="sagesla-plugin" if net.plugins else "none",
        hardware_compatibility=plan.options.hardware_compatibility,
        version_compatible=plan.options.version_compatible,
        details=dict(
            build_gpu=plan.build_gpu or plan.target, profile=net.profile_name,
            plugin_ptx_sha256=ptx[0] if len(ptx) == 1 else (ptx or None),
            plugin_ptx=[dict(plugin=p.plugin, kernel_target=p.kernel_target,
                             ptx_versions=sorted({t["ptx_version"] for k in p.kernels if k["status"] == "ok"
                                                  for t in k["ptx"]}))
                        for p in net.plugins],
            refittable=plan.options.refittable, weight_stripped=plan.options.weight_stripped,
        ),
    )
