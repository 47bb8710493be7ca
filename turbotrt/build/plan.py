"""Build plans: what TensorRT would be asked for, made without TensorRT or a GPU.

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
from dataclasses import asdict, dataclass
from pathlib import Path

from turbotrt.core import sagesla as C
from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import TurbotrtError
from turbotrt.core.files import write_atomic
from turbotrt.core.gpu import compute_capability
from turbotrt.plugins.sagesla.aot import SUPPORTED_TARGETS

PLAN_VERSION = 1
MIN_TENSORRT = (10, 9)  # tensorrt.plugin.aot_impl and PREFER_AOT_PYTHON_PLUGINS
# option value -> trt.HardwareCompatibilityLevel member
HARDWARE_COMPATIBILITY = {"none": "NONE", "ampere_plus": "AMPERE_PLUS",
                          "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
OPTIMIZATION_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level; TensorRT's default is 3
PLUGIN_REGISTRATION = "turbotrt.plugins.trt:register_plugins"
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
_STANDARD_DOMAINS = ("", "ai.onnx")


class BuildError(TurbotrtError):
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
    engine: str  # relative to the bundle: engines/<flavour>/<target>/<network>.plan
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
    profile_name = bundle.profile.name
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
    spec = bundle.spec(name)
    path = bundle.graph(name)
    data = bundle.data(name)
    graph = read_graph(path, data.name if data else None)
    problems, warnings = [], []
    shapes = {i.name: i.shape for i in spec.inputs}
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
    net = NetworkPlan(
        network=name, onnx=path.relative_to(bundle.root).as_posix(),
        external_data=data.relative_to(bundle.root).as_posix() if data else None,
        engine=f"engines/tensorrt/{target}/{name}.plan", network_flags=tuple(network_flags),
        parser_flags=tuple(parser_flags), profile_name=profile_name, shapes=shapes,
        inputs=tuple(asdict(i) for i in spec.inputs), outputs=tuple(asdict(o) for o in spec.outputs),
        plugins=tuple(plugins), config=config,
    )
    return net, problems, warnings


def read_graph(path: Path, data_file: str | None = None) -> dict:
    """Inputs, custom ops and SageSLA nodes of an ONNX graph, read without its weights (after checking
    that its external data stays in `data_file`: the builder's parser will read it)."""
    try:
        import onnx
        from onnx import helper

        from turbotrt.export.graph_files import load_graph
    except ImportError as e:
        raise BuildError(f"planning a build reads the ONNX graphs with the `onnx` package: {e}") from None
    model = load_graph(path, data_file)
    g = model.graph
    initializers = {t.name for t in g.initializer}
    inputs = {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
              for i in g.input if i.name not in initializers}
    types = {v.name: v.type.tensor_type for v in list(g.value_info) + list(g.input)}
    custom: dict[str, int] = {}
    sagesla = []
    fp8 = any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in g.initializer)
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
                kept_blocks=attrs.get("kept_blocks"), sm_scale=attrs.get("sm_scale"), quant=attrs.get("quant", "none"),
                plugin_namespace=attrs.get("plugin_namespace", ""), plugin_version=attrs.get("plugin_version", "1"),
                head_dim=q_shape[-1] if q_shape and q_shape[-1] > 0 else None,
                dtype=_ONNX_DTYPES.get(q.elem_type) if q is not None else None,
            ))
    return dict(inputs=inputs, custom_ops=custom, sagesla=sagesla, fp8=fp8)


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), plan.to_json())
    return plan
