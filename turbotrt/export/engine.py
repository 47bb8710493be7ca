"""`turbotrt build`: a bundle's ONNX graphs -> TensorRT engines, one per network and GPU target.

Three layers, each usable on its own:

    BuildOptions  what the user asks for (target GPU, memory, compatibility, refit, networks)
    BuildPlan     everything TensorRT will be asked for, per network: ONNX file, network and parser
                  flags, the static shape profile, builder config, timing cache, plugins, engine path.
                  Made without TensorRT or a GPU (`--dry-run`), so a build can be reviewed anywhere.
    loaders       Polygraphy loaders generated from one network's plan; building runs them.

The network is strongly typed: precision comes from the graph's types and its explicit Q/DQ, so no
precision flags are set. Graphs with `turbodiffusion::SageSLA` nodes get the plugin's ahead-of-time
kernel: its PTX is embedded in the engine, which then runs from plain libnvinfer without Python.
TensorRT is imported only when an engine is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import click

from turbotrt.bundle import MANIFEST, Bundle, BundleError, write_manifest
from turbotrt.plugins.sagesla import contract as C
from turbotrt.plugins.sagesla.aot import SUPPORTED_TARGETS
from turbotrt.runtime.gpu import compute_capability

PLAN_VERSION = 1
MIN_TENSORRT = (10, 9)  # tensorrt.plugin.aot_impl and PREFER_AOT_PYTHON_PLUGINS
# option value -> trt.HardwareCompatibilityLevel member
HARDWARE_COMPATIBILITY = {"none": "NONE", "ampere_plus": "AMPERE_PLUS",
                          "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
OPTIMIZATION_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level; TensorRT's default is 3
PLUGIN_REGISTRATION = "turbotrt.plugins.trt:register_plugins"
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
_STANDARD_DOMAINS = ("", "ai.onnx")


class BuildError(RuntimeError):
    """The build cannot run here (no TensorRT or GPU, wrong GPU) or its plan has problems."""


def default_timing_cache_dir() -> Path:
    # Timing caches depend on the GPU and TensorRT, not on the bundle: share them across bundles.
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "turbotrt" / "timing-cache"


@dataclass(frozen=True)
class BuildOptions:
    """What to build. Both the plan and the Polygraphy builder config are generated from this."""

    target: str = "auto"  # "auto" (this machine's GPU) or one of SUPPORTED_TARGETS
    workspace_gib: float | None = None  # builder workspace pool limit; None: TensorRT's default (all GPU memory)
    timing_cache: bool = True
    timing_cache_dir: str | None = None  # None: default_timing_cache_dir()
    hardware_compatibility: str = "none"  # a key of HARDWARE_COMPATIBILITY
    version_compatible: bool = False
    refittable: bool = False
    weight_stripped: bool = False
    networks: tuple[str, ...] | None = None  # None: every network of the bundle
    optimization_level: int | None = None  # 0..5; None: TensorRT's default
    tf32: bool = False  # fp32 GEMMs in TF32: faster, but outside fp32 validation tolerances
    tensorrt_version: str | None = None  # planning without TensorRT: the version the build will use

    def __post_init__(self):
        if self.target != "auto" and self.target not in SUPPORTED_TARGETS:
            raise ValueError(f"unsupported target {self.target!r}; use 'auto' (this machine's GPU) or one of "
                             f"{', '.join(SUPPORTED_TARGETS)}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ValueError(f"unknown hardware compatibility {self.hardware_compatibility!r}; choose from "
                             f"{', '.join(HARDWARE_COMPATIBILITY)}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise ValueError(f"workspace must be a positive number of GiB, got {self.workspace_gib!r}")
        level = self.optimization_level
        if level is not None and (type(level) is not int or level not in OPTIMIZATION_LEVELS):
            raise ValueError(f"builder optimization level must be an int in 0..5, got {level!r}")
        if self.networks is not None:
            networks = (self.networks,) if isinstance(self.networks, str) else tuple(dict.fromkeys(self.networks))
            if not networks:
                raise ValueError("networks must name at least one network (or be None for all)")
            object.__setattr__(self, "networks", networks)

    @property
    def hardware_compatible(self) -> bool:
        return self.hardware_compatibility != "none"

    def builder_config(self, timing_cache: str | None) -> dict:
        """The builder config as TensorRT names it (enum members by name): what the plan records and
        what `create_config_kwargs` turns into Polygraphy's CreateConfig."""
        extra_flags = []
        if self.weight_stripped and not self.refittable:
            # Weights ship in the ONNX data beside the engine, identical to the build's: REFIT_IDENTICAL
            # lets the builder optimise as if they were constants and still strip them.
            extra_flags.append("REFIT_IDENTICAL")
        return dict(
            strongly_typed=True,
            precision_flags=[],  # strongly typed: types come from the graph, never from builder flags
            tf32=self.tf32,
            memory_pool_limits={"WORKSPACE": int(self.workspace_gib * 2**30)} if self.workspace_gib else {},
            builder_optimization_level=self.optimization_level,
            hardware_compatibility_level=HARDWARE_COMPATIBILITY[self.hardware_compatibility],
            version_compatible=self.version_compatible,
            refittable=self.refittable,
            strip_plan=self.weight_stripped,
            extra_builder_flags=extra_flags,
            timing_cache=timing_cache,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["networks"] = list(self.networks) if self.networks is not None else None
        return d


# --- the plan -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PluginUse:
    """One custom op a graph uses and the plugin TensorRT maps it to."""

    plugin: str  # "namespace::name"
    namespace: str
    name: str
    version: str
    nodes: int
    implementation: str  # "aot": kernel PTX embedded in the engine
    kernel_target: str  # the GPU arch the PTX is compiled for (the building GPU)
    kernels: tuple[dict, ...]  # per distinct attribute set: geometry, dtype, status, PTX per tactic
    ptx_sha256: str | None  # fingerprint of every tactic's embedded PTX; None when not compiled here

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernels"] = list(self.kernels)
        return d


@dataclass(frozen=True)
class NetworkPlan:
    network: str
    onnx: str  # relative to the bundle
    external_data: str | None
    engine: str  # relative to the bundle: engines/<target>/<network>.plan
    network_flags: tuple[str, ...]  # trt.NetworkDefinitionCreationFlag members
    parser_flags: tuple[str, ...]  # trt.OnnxParserFlag members (replaces the parser's defaults)
    profile_name: str
    shapes: dict  # input -> static shape: the profile's min = opt = max
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
    plugins: tuple[PluginUse, ...]
    config: dict  # BuildOptions.builder_config()

    @property
    def uses_plugins(self) -> bool:
        return bool(self.plugins)

    @property
    def profile(self) -> dict:
        return {"name": self.profile_name,
                "inputs": {n: {"min": list(s), "opt": list(s), "max": list(s)} for n, s in self.shapes.items()}}

    def to_dict(self) -> dict:
        return dict(network=self.network, onnx=self.onnx, external_data=self.external_data, engine=self.engine,
                    network_flags=list(self.network_flags), parser_flags=list(self.parser_flags),
                    profile=self.profile, inputs=list(self.inputs), outputs=list(self.outputs),
                    plugins=[p.to_dict() for p in self.plugins], config=self.config)


@dataclass(frozen=True)
class BuildPlan:
    bundle: Path
    target: str
    build_gpu: str | None  # the GPU that builds; None: a dry run, assumed to be the target
    tensorrt_version: str | None
    options: BuildOptions
    networks: tuple[NetworkPlan, ...]
    plugin_registration: str = PLUGIN_REGISTRATION
    plugin_libraries: tuple[str, ...] = ()  # the plugins are Python-defined: no shared libraries to load
    problems: tuple[str, ...] = ()  # each stops a build
    warnings: tuple[str, ...] = ()

    def network(self, name: str) -> NetworkPlan:
        for n in self.networks:
            if n.network == name:
                return n
        raise KeyError(name)

    def to_dict(self) -> dict:
        return dict(
            plan_version=PLAN_VERSION, bundle=str(self.bundle), target=self.target, build_gpu=self.build_gpu,
            tensorrt=dict(version=self.tensorrt_version, minimum=".".join(map(str, MIN_TENSORRT))),
            options=self.options.to_dict(),
            plugins=dict(registration=self.plugin_registration, libraries=list(self.plugin_libraries)),
            networks={n.network: n.to_dict() for n in self.networks},
            problems=list(self.problems), warnings=list(self.warnings),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def installed_tensorrt_version() -> str | None:
    try:
        import tensorrt
    except Exception:  # not installed, or its libraries fail to load: either way, not usable here
        return None
    return tensorrt.__version__


def timing_cache_path(options: BuildOptions, gpu: str, tensorrt_version: str | None) -> str | None:
    """Timing caches hold tactic timings measured on one GPU with one TensorRT: one file per pair."""
    if not options.timing_cache:
        return None
    folder = Path(options.timing_cache_dir) if options.timing_cache_dir else default_timing_cache_dir()
    return str(folder / f"{gpu}-trt{tensorrt_version or '-unknown'}.cache")


def plan_build(bundle: Bundle | str | os.PathLike, options: BuildOptions, gpu: str | None = None,
               tensorrt_version: str | None = None) -> BuildPlan:
    """The build plan of `bundle` for `options`, made without TensorRT or a GPU.

    gpu: the compute capability of the GPU that will build ("sm_90"); None for a dry run, where the
    build is assumed to run on the target (and target "auto" is resolved from this machine's GPU).
    tensorrt_version: the TensorRT that will build; None for options.tensorrt_version or the installed one.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify=False)
    target = options.target
    if target == "auto":
        target = gpu or compute_capability()
        if target is None:
            raise ValueError("target 'auto' means this machine's GPU, and there is none: name the GPU the engines "
                             f"are for with --target ({', '.join(SUPPORTED_TARGETS)})")
        if target not in SUPPORTED_TARGETS:
            raise ValueError(f"this machine's GPU is {target}; turbotrt builds for {', '.join(SUPPORTED_TARGETS)}")
    trt_version = tensorrt_version or options.tensorrt_version or installed_tensorrt_version()
    builder = gpu or target  # the PTX and the timing cache belong to the GPU that builds
    problems, warnings = [], []
    if gpu is not None and gpu != target and options.hardware_compatibility != "ampere_plus":
        problems.append(f"this GPU is {gpu} but the target is {target}: TensorRT builds for the GPU it runs on. "
                        f"Build on a {target} GPU, or pass --hardware-compatibility ampere_plus for an engine that "
                        f"also runs on other Ampere-or-newer GPUs")
    if trt_version is None:
        warnings.append("TensorRT version unknown (not installed here): the timing cache name and the engines' "
                        "tensorrt_version come from the building machine; pass --tensorrt-version to plan for one")
    if options.version_compatible and (options.refittable or options.weight_stripped):
        warnings.append("version-compatible engines run in TensorRT's lean runtime on newer TensorRT versions, "
                        "which NVIDIA documents as unable to refit: refittable or weight-stripped engines may "
                        "only load in the TensorRT that built them")
    if options.version_compatible:
        warnings.append("version-compatible engines carry TensorRT's lean runtime: the loader must allow engine "
                        "host code (trt.Runtime.engine_host_code_allowed)")
    if options.weight_stripped:
        warnings.append("weight-stripped engines must be refitted from the bundle's ONNX weights when loaded")

    names = list(options.networks) if options.networks is not None else bundle.networks
    unknown = [n for n in names if n not in bundle.networks]
    if unknown:
        raise ValueError(f"{bundle.root} has no network {', '.join(unknown)}; it has {', '.join(bundle.networks)}")
    cache = timing_cache_path(options, builder, trt_version)
    config = options.builder_config(cache)
    profile_name = bundle.profile.get("name", "static")
    networks = []
    for name in names:
        net, net_problems, net_warnings = _plan_network(bundle, name, target, builder, profile_name, config, options)
        networks.append(net)
        problems += net_problems
        warnings += net_warnings
    return BuildPlan(bundle=bundle.root.resolve(), target=target, build_gpu=gpu, tensorrt_version=trt_version,
                     options=options, networks=tuple(networks), problems=tuple(problems), warnings=tuple(warnings))


def _plan_network(bundle: Bundle, name: str, target: str, builder: str, profile_name: str, config: dict,
                  options: BuildOptions) -> tuple[NetworkPlan, list[str], list[str]]:
    entry = bundle.manifest["graphs"][name]
    spec = bundle.spec(name)
    path = bundle.graph(name)
    graph = read_graph(path)
    problems, warnings = [], []
    shapes = {i["name"]: tuple(i["shape"]) for i in spec["inputs"]}
    if graph["inputs"] != shapes:
        problems.append(f"{name}: {path.name} has inputs {graph['inputs']} but the manifest says {shapes}; "
                        f"export the bundle again")
    if any(d <= 0 for s in shapes.values() for d in s):
        problems.append(f"{name}: the manifest has a non-static input shape {shapes}; engines are built for "
                        f"static shapes only")
    for op, count in graph["custom_ops"].items():
        if op != f"{C.DOMAIN}::{C.OP_TYPE}":
            warnings.append(f"{name}: {count} {op} nodes: TensorRT parses them only if a plugin of that name is "
                            f"registered")
    plugins = []
    network_flags = ["STRONGLY_TYPED"]
    # Set explicitly because parser flags replace TensorRT's defaults; the native InstanceNormalization
    # layer is also what hardware- and version-compatible engines require.
    parser_flags = ["NATIVE_INSTANCENORM"]
    nodes = graph["sagesla"]
    if nodes:
        use, plugin_problems, plugin_warnings = _plan_sagesla(name, nodes, target, builder, options)
        plugins.append(use)
        problems += plugin_problems
        warnings += plugin_warnings
        # The plugin defines a JIT (Python) and an AOT (PTX) implementation; only AOT runs without Python.
        network_flags.append("PREFER_AOT_PYTHON_PLUGINS")
        if any(not n["plugin_namespace"] for n in nodes):
            # Without plugin_namespace the parser inlines the node's ONNX function (the float reference).
            parser_flags.append("ENABLE_PLUGIN_OVERRIDE")
    data = entry.get("data")
    net = NetworkPlan(
        network=name, onnx=entry["file"], external_data=data if data and (bundle.root / data).is_file() else None,
        engine=f"engines/{target}/{name}.plan", network_flags=tuple(network_flags), parser_flags=tuple(parser_flags),
        profile_name=profile_name, shapes=shapes, inputs=tuple(spec["inputs"]), outputs=tuple(spec["outputs"]),
        plugins=tuple(plugins), config=config,
    )
    return net, problems, warnings


def read_graph(path: Path) -> dict:
    """Inputs, custom ops and SageSLA nodes of an ONNX graph, read without its weights."""
    try:
        import onnx
        from onnx import helper
    except ImportError as e:
        raise BuildError(f"planning a build reads the ONNX graphs with the `onnx` package: {e}") from None
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    initializers = {t.name for t in g.initializer}
    inputs = {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
              for i in g.input if i.name not in initializers}
    types = {v.name: v.type.tensor_type for v in list(g.value_info) + list(g.input)}
    custom: dict[str, int] = {}
    sagesla = []
    for node in g.node:
        if node.domain in _STANDARD_DOMAINS:
            continue
        op = f"{node.domain}::{node.op_type}"
        custom[op] = custom.get(op, 0) + 1
        if node.domain == C.DOMAIN and node.op_type == C.OP_TYPE:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            q = types.get(node.input[0])
            q_shape = [d.dim_value for d in q.shape.dim] if q is not None and q.HasField("shape") else None
            sagesla.append(dict(
                name=node.name, block_q=attrs.get("block_q"), block_k=attrs.get("block_k"),
                topk=attrs.get("topk"), sm_scale=attrs.get("sm_scale"), quant=attrs.get("quant", "none"),
                plugin_namespace=attrs.get("plugin_namespace", ""), plugin_version=attrs.get("plugin_version", "1"),
                head_dim=q_shape[-1] if q_shape and q_shape[-1] > 0 else None,
                dtype=_ONNX_DTYPES.get(q.elem_type) if q is not None else None,
            ))
    return dict(inputs=inputs, custom_ops=custom, sagesla=sagesla)


def _plan_sagesla(network: str, nodes: list[dict], target: str, builder: str, options: BuildOptions):
    problems, warnings = [], []
    namespaces = {n["plugin_namespace"] or C.PLUGIN_NAMESPACE for n in nodes}
    versions = {n["plugin_version"] for n in nodes}
    if namespaces != {C.PLUGIN_NAMESPACE} or versions != {C.PLUGIN_VERSION}:
        problems.append(f"{network}: SageSLA nodes name plugin namespace {sorted(namespaces)} version "
                        f"{sorted(versions)}, but turbotrt registers {C.PLUGIN_NAME} version {C.PLUGIN_VERSION}; "
                        f"export the bundle again with this turbotrt")
    if builder != target:
        problems.append(f"{network}: the SageSLA kernel is compiled to PTX for the GPU that builds ({builder}); "
                        f"it would not run on {target}. Build this network on a {target} GPU")
    elif options.hardware_compatible:
        warnings.append(f"{network}: hardware compatibility does not extend to the SageSLA kernel, whose PTX "
                        f"targets {target} (sm_90 and newer PTX is architecture-specific): the engine needs a "
                        f"GPU that can run that PTX")
    configs: dict[tuple, int] = {}
    for n in nodes:
        key = (n["block_q"], n["block_k"], n["head_dim"], n["quant"], n["dtype"], n["sm_scale"])
        configs[key] = configs.get(key, 0) + 1
    kernels = []
    for (block_q, block_k, head_dim, quant, dtype, sm_scale), count in configs.items():
        kernel = dict(block_q=block_q, block_k=block_k, head_dim=head_dim, quant=quant, dtype=dtype,
                      sm_scale=sm_scale, nodes=count)
        kernel.update(sagesla_ptx(builder, block_q, block_k, head_dim, quant, dtype, sm_scale))
        if kernel["status"] == "unsupported":
            problems.append(f"{network}: no SageSLA kernel for {builder}: {kernel['reason']}. Export the bundle "
                            f"with a geometry and quantization the kernels support (--block-q/--block-k "
                            f"{' or '.join('/'.join(map(str, g)) for g in C.KERNEL_GEOMETRIES)}, --v-dtype)")
        elif kernel["status"] == "unavailable":
            warnings.append(f"{network}: SageSLA PTX not compiled while planning ({kernel['reason']}); the "
                            f"build compiles it")
        elif options.hardware_compatible and any(t["shared_mem"] > 48 * 1024 for t in kernel["ptx"]):
            warnings.append(f"{network}: a SageSLA tactic uses more than 48 KiB of shared memory, which "
                            f"hardware-compatible engines cap")
        kernels.append(kernel)
    compiled = [t["launch_sha256"] for k in kernels if k["status"] == "ok" for t in k["ptx"]]
    fingerprint = None
    if compiled and all(k["status"] == "ok" for k in kernels):
        fingerprint = hashlib.sha256("\n".join(sorted(compiled)).encode()).hexdigest()
    use = PluginUse(plugin=C.PLUGIN_NAME, namespace=C.PLUGIN_NAMESPACE, name=C.OP_TYPE, version=C.PLUGIN_VERSION,
                    nodes=len(nodes), implementation="aot", kernel_target=builder, kernels=tuple(kernels),
                    ptx_sha256=fingerprint)
    return use, problems, warnings


def sagesla_ptx(target: str, block_q, block_k, head_dim, quant, dtype, sm_scale) -> dict:
    """The PTX the plugin's aot_impl embeds for each tactic, compiled here as it compiles it.

    {"status": "ok", "ptx": [...]} | {"status": "unsupported", "reason"} (no kernel: the build would
    fail) | {"status": "unavailable", "reason"} (Triton's compiler is not usable here).
    TensorRT embeds the tactic its autotuner picks; which one is not reported, so every tactic's is listed.
    """
    from turbotrt.plugins.sagesla import aot

    if head_dim is None or dtype is None:
        return dict(status="unavailable", reason="the graph does not record the shape and type of q")
    try:
        # The default configuration first: it checks target, geometry and quant before Triton is imported.
        aot.compile_ptx(target, block_q, block_k, head_dim, quant, dtype, sm_scale=sm_scale)
        from turbotrt.plugins import trt as plugin

        ptx = []
        for tactic in plugin.tactics_for(quant):
            warps, stages = plugin.tactic_config(tactic, block_q, head_dim)
            k = aot.compile_ptx(target, block_q, block_k, head_dim, quant, dtype, sm_scale=sm_scale,
                                num_warps=warps, num_stages=stages)
            ptx.append(dict(tactic=tactic, num_warps=k.num_warps, num_stages=k.num_stages, shared_mem=k.shared_mem,
                            sha256=k.sha256, launch_sha256=hashlib.sha256(k.launch_ptx.encode()).hexdigest(),
                            ptx_version=k.ptx_version, ptx_target=k.ptx_target, kernel=k.name))
    except ValueError as e:
        return dict(status="unsupported", reason=str(e))
    except (ImportError, RuntimeError) as e:
        return dict(status="unavailable", reason=str(e).splitlines()[0] if str(e) else type(e).__name__)
    return dict(status="ok", ptx=ptx)


def write_plan(bundle: Bundle | str | os.PathLike, options: BuildOptions, path: str | os.PathLike,
               **plan_kwargs) -> BuildPlan:
    """Plan the build (no TensorRT needed) and write it as JSON to `path` atomically."""
    plan = plan_build(bundle, options, **plan_kwargs)
    _write_atomic(Path(path), plan.to_json().encode())
    return plan


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    engines: dict[str, dict] = field(default_factory=dict)  # network -> manifest engine entry
    seconds: float = 0.0


def build_engines(bundle_dir: str | os.PathLike, options: BuildOptions, log: Callable[[str], None] = print,
                  verify: bool = True, plan_out: str | os.PathLike | None = None) -> BuildResult:
    """Build the engines of `options.networks` (all by default) on this machine's GPU, save them under
    `engines/<target>/` and record them in the bundle's manifest (atomically, after each engine).

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
    _forget_missing_engines(Path(bundle_dir), log)
    try:
        bundle = Bundle.load(bundle_dir, verify=verify)
    except BundleError as e:
        raise BuildError(str(e)) from None
    plan = plan_build(bundle, options, gpu=gpu, tensorrt_version=trt.__version__)
    if plan_out is not None:
        _write_atomic(Path(plan_out), plan.to_json().encode())
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
        _write_atomic(bundle.root / net.engine, view)
        entry = engine_entry(plan, net, hashlib.sha256(view).hexdigest(), view.nbytes)
        record_engine(bundle.root, net.network, entry)
        result.engines[net.network] = entry
        log(f"[{net.network}] wrote {net.engine} ({view.nbytes / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    result.seconds = time.perf_counter() - start
    return result


def engine_entry(plan: BuildPlan, net: NetworkPlan, sha256: str, size: int) -> dict:
    """The manifest's record of one built engine (what `Bundle.engine` matches on, and what was asked)."""
    ptx = [p.ptx_sha256 for p in net.plugins]
    return dict(
        file=net.engine, compute_capability=plan.target, tensorrt_version=plan.tensorrt_version,
        build_gpu=plan.build_gpu or plan.target, profile=net.profile_name,
        plugin_ptx_sha256=ptx[0] if len(ptx) == 1 else (ptx or None),
        plugin_ptx=[dict(plugin=p.plugin, kernel_target=p.kernel_target,
                         ptx_versions=sorted({t["ptx_version"] for k in p.kernels if k["status"] == "ok"
                                              for t in k["ptx"]}))
                    for p in net.plugins],
        hardware_compatibility=plan.options.hardware_compatibility,
        version_compatible=plan.options.version_compatible, refittable=plan.options.refittable,
        weight_stripped=plan.options.weight_stripped, sha256=sha256, bytes=size,
    )


def record_engine(root: Path, network: str, entry: dict) -> None:
    """Add `entry` to the manifest's engines of `network`, replacing any entry for the same file (an
    older build now overwritten), and its sha256 to `files`; written atomically.

    The manifest is read again here, so entries another build wrote meanwhile are kept.
    """
    manifest = json.loads((root / MANIFEST).read_text())
    engines = manifest.setdefault("engines", {})
    engines[network] = [e for e in engines.get(network, []) if e["file"] != entry["file"]] + [entry]
    manifest.setdefault("files", {})[entry["file"]] = entry["sha256"]
    write_manifest(root, manifest)


def _forget_missing_engines(root: Path, log: Callable[[str], None]) -> None:
    """Drop manifest entries of engine files that were deleted, so the bundle loads and can be rebuilt."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return  # Bundle.load reports it
    files, engines = manifest.get("files") or {}, manifest.get("engines") or {}
    gone = {f for f in files if f.startswith("engines/") and not (root / f).is_file()}
    gone |= {e["file"] for entries in engines.values() for e in entries if not (root / e["file"]).is_file()}
    if not gone:
        return
    for f in gone:
        files.pop(f, None)
    manifest["engines"] = {n: [e for e in entries if e["file"] not in gone] for n, entries in engines.items()}
    write_manifest(root, manifest)
    log(f"forgot {len(gone)} deleted engine file(s): {', '.join(sorted(gone))}")


# --- command line -------------------------------------------------------------------------------------

@click.command("build")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--target", default="auto", show_default=True,
              help=f"GPU the engines are for: auto (this machine's GPU) or {', '.join(SUPPORTED_TARGETS)}.")
@click.option("--network", "networks", multiple=True,
              help="Build only this network (repeat for several); default: every network of the bundle.")
@click.option("--dry-run", is_flag=True,
              help="Write the build plan (JSON) and stop: needs neither TensorRT nor a GPU.")
@click.option("--plan-out", type=click.Path(dir_okay=False),
              help="Write the plan to this file (atomically); a dry run prints it when this is not given.")
@click.option("--workspace-gib", type=float, default=None,
              help="Cap TensorRT's builder workspace, in GiB (default: TensorRT's, the GPU's memory).")
@click.option("--timing-cache", "timing_cache_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of timing caches, one per GPU and TensorRT version, reused across builds "
                   "(default: ~/.cache/turbotrt/timing-cache).")
@click.option("--no-timing-cache", is_flag=True, help="Neither read nor write a timing cache.")
@click.option("--hardware-compatibility", type=click.Choice(list(HARDWARE_COMPATIBILITY)), default="none",
              show_default=True,
              help="Engines that also run on other GPUs: ampere_plus (any Ampere or newer) or "
                   "same_compute_capability; slower, and the SageSLA kernel stays specific to the building GPU.")
@click.option("--version-compatible", is_flag=True,
              help="Engines that newer TensorRT versions (same major) can load, through the lean runtime.")
@click.option("--refittable", is_flag=True, help="Engines whose weights can be replaced without a rebuild.")
@click.option("--weight-stripped", is_flag=True,
              help="Leave the weights out of the engines (small files); they are refitted from the bundle's "
                   "ONNX weights when loaded.")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None,
              help="TensorRT builder optimization level, 0-5 (default: TensorRT's, 3); higher builds longer.")
@click.option("--tf32", is_flag=True, help="Allow TF32 for fp32 GEMMs (faster, less exact than fp32 validation).")
@click.option("--tensorrt-version", default=None,
              help="For a dry run without TensorRT: the version the build will use (names the timing cache).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files before building.")
def build_command(bundle, target, networks, dry_run, plan_out, workspace_gib, timing_cache_dir, no_timing_cache,
                  hardware_compatibility, version_compatible, refittable, weight_stripped, optimization_level, tf32,
                  tensorrt_version, no_verify):
    """Build TensorRT engines for the networks of BUNDLE (a folder from `turbotrt export`).

    Each ONNX graph is parsed as a strongly typed network (its types and explicit Q/DQ set the
    precision) with its static shapes as the only optimization profile, SageSLA nodes become the
    turbodiffusion::SageSLA plugin with its ahead-of-time kernel embedded, and the engine is written to
    BUNDLE/engines/<target>/<network>.plan and recorded in manifest.json.

    Building needs TensorRT (>= 10.9) and the GPU the engines are for. --dry-run needs neither: it
    writes the plan, everything TensorRT would be asked for, and lists what would stop the build."""
    try:
        options = BuildOptions(
            target=target, workspace_gib=workspace_gib, timing_cache=not no_timing_cache,
            timing_cache_dir=timing_cache_dir, hardware_compatibility=hardware_compatibility,
            version_compatible=version_compatible, refittable=refittable, weight_stripped=weight_stripped,
            networks=tuple(networks) or None, optimization_level=optimization_level, tf32=tf32,
            tensorrt_version=tensorrt_version,
        )
        if dry_run:
            plan = plan_build(bundle, options)
            if plan_out:
                _write_atomic(Path(plan_out), plan.to_json().encode())
                click.echo(f"wrote the build plan of {len(plan.networks)} networks for {plan.target} to {plan_out}")
            else:
                click.echo(plan.to_json(), nl=False)
            for w in plan.warnings:
                click.echo(f"warning: {w}", err=True)
            if plan.problems:
                click.echo("a build would stop on:\n  - " + "\n  - ".join(plan.problems), err=True)
            return
        result = build_engines(bundle, options, log=click.echo, verify=not no_verify, plan_out=plan_out)
    except (BuildError, BundleError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"built {', '.join(result.engines)} for {result.plan.target} in {result.seconds:.1f} s")

