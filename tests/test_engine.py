"""`turbotrt build`: the plan (no TensorRT), the Polygraphy config made from it, and the manifest
updates of a build, up to the call into TensorRT; the TensorRT builds themselves skip without it."""

import enum
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from turbotrt.build import plan as P
from turbotrt.build import tensorrt as T
from turbotrt.cli import main
from turbotrt.core import sagesla as C
from turbotrt.core.bundle import MANIFEST, Bundle, BundleError
from turbotrt.core.configs import AttentionConfig, default_profile, get_config
from turbotrt.core.manifest import GraphEntry, GraphSpec, IOSpec, Manifest, Sampler, Tolerance

TRT_VERSION = "10.13.0"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from turbotrt.export.api import export

    out = tmp_path_factory.mktemp("engine") / "bundle"
    # 64x64 SLA blocks on purpose: a geometry the AOT kernel is not built for, so plans must say so
    # (the kernels' own 128/64 geometry is covered by _sagesla_bundle below).
    export("wan-tiny", out, precision="fp32", attention="sagesla", block_q=64, block_k=64, validate=False,
           log=lambda *_: None)
    return out


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path):
    """A copy to build into: builds change the bundle."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(P, "compute_capability", lambda: None)
    monkeypatch.setattr(T, "compute_capability", lambda: None)


def _manifest(path):
    return json.loads((Path(path) / MANIFEST).read_text())


# --- the plan -----------------------------------------------------------------------------------------

def test_plan_lists_every_network_with_its_static_profile(bundle_dir, no_gpu, tmp_path):
    manifest = _manifest(bundle_dir)
    plan = P.plan_build(bundle_dir, P.BuildOptions(target="sm_90", timing_cache_dir=str(tmp_path)))
    assert [n.network for n in plan.networks] == list(manifest["graphs"])
    assert plan.target == "sm_90" and plan.build_gpu is None
    for net in plan.networks:
        spec = manifest["graphs"][net.network]["spec"]
        d = net.to_dict()
        assert d["profile"]["name"] == manifest["profile"]["name"]
        want = {i["name"]: i["shape"] for i in spec["inputs"]}
        assert {n: s["min"] for n, s in d["profile"]["inputs"].items()} == want
        assert all(s["min"] == s["opt"] == s["max"] for s in d["profile"]["inputs"].values())
        assert d["onnx"] == manifest["graphs"][net.network]["file"] and (bundle_dir / d["onnx"]).is_file()
        assert d["external_data"] == manifest["graphs"][net.network]["data"]
        assert d["engine"] == f"engines/tensorrt/sm_90/{net.network}.plan"
        assert d["network_flags"][0] == "STRONGLY_TYPED" and "NATIVE_INSTANCENORM" in d["parser_flags"]
        assert d["config"]["strongly_typed"] and d["config"]["precision_flags"] == []
    assert plan.options.networks is None


def test_plan_records_the_sagesla_plugin_only_where_the_graph_has_it(bundle_dir, no_gpu):
    manifest = _manifest(bundle_dir)
    plan = P.plan_build(bundle_dir, P.BuildOptions(target="sm_90"))
    dit = plan.network("dit")
    (use,) = dit.plugins
    assert (use.plugin, use.namespace, use.name, use.version) == (C.PLUGIN_NAME, C.PLUGIN_NAMESPACE, C.OP_TYPE,
                                                                  C.PLUGIN_VERSION)
    assert use.nodes == manifest["model"]["num_layers"]  # one SageSLA node per block, read from the graph
    assert use.implementation == "aot" and use.kernel_target == "sm_90"
    (kernel,) = use.kernels
    att = manifest["attention"]
    head_dim = manifest["model"]["dim"] // manifest["model"]["num_heads"]
    assert (kernel["block_q"], kernel["block_k"], kernel["head_dim"], kernel["dtype"]) == (
        att["block_q"], att["block_k"], head_dim, "float32")
    assert "PREFER_AOT_PYTHON_PLUGINS" in dit.network_flags
    assert "ENABLE_PLUGIN_OVERRIDE" not in dit.parser_flags  # the nodes carry plugin_namespace
    for net in plan.networks:
        if net.network != "dit":
            assert net.plugins == () and net.network_flags == ("STRONGLY_TYPED",)
    # this bundle's SLA blocks are 64x64, a geometry the AOT kernel is not built for: the plan says so
    assert kernel["status"] == "unsupported" and use.ptx_sha256 is None
    assert any("dit: no SageSLA kernel" in p and "(64, 64)" in p for p in plan.problems)


def test_network_subset_and_unknown_networks(bundle_dir, no_gpu):
    plan = P.plan_build(bundle_dir, P.BuildOptions(target="sm_90", networks=("vae_decode_step", "text_encoder")))
    assert [n.network for n in plan.networks] == ["vae_decode_step", "text_encoder"]
    assert plan.problems == ()  # no DiT, so nothing stops this build
    with pytest.raises(ValueError, match="no network dit_low; it has dit, text_encoder"):
        P.plan_build(bundle_dir, P.BuildOptions(target="sm_90", networks=("dit_low",)))


def test_timing_cache_is_one_file_per_gpu_and_tensorrt_version(bundle_dir, no_gpu, tmp_path):
    def cache(target, version, **kw):
        opts = P.BuildOptions(target=target, timing_cache_dir=str(tmp_path), networks=("text_encoder",), **kw)
        return P.plan_build(bundle_dir, opts, tensorrt_version=version).network("text_encoder").config["timing_cache"]

    paths = {cache(t, v) for t in ("sm_80", "sm_90", "sm_120") for v in ("10.9.0", "10.13.0")}
    assert len(paths) == 6 and all(Path(p).parent == tmp_path for p in paths)
    assert Path(cache("sm_90", "10.13.0")).name == "sm_90-trt10.13.0.cache"
    assert cache("sm_90", "10.13.0", timing_cache=False) is None
    # the --tensorrt-version option names it when TensorRT is not here to ask
    opts = P.BuildOptions(target="sm_86", timing_cache_dir=str(tmp_path), tensorrt_version="10.11.0")
    assert P.plan_build(bundle_dir, opts).tensorrt_version == "10.11.0"


def test_options_become_builder_settings(bundle_dir, no_gpu):
    opts = P.BuildOptions(target="sm_89", workspace_gib=1.5, hardware_compatibility="same_compute_capability",
                          version_compatible=True, weight_stripped=True, optimization_level=5, tf32=True,
                          networks=("text_encoder",))
    cfg = P.plan_build(bundle_dir, opts).network("text_encoder").config
    assert cfg["memory_pool_limits"] == {"WORKSPACE": 3 * 2**29}
    assert cfg["hardware_compatibility_level"] == "SAME_COMPUTE_CAPABILITY"
    assert cfg["version_compatible"] and cfg["strip_plan"] and not cfg["refittable"] and cfg["tf32"]
    assert cfg["extra_builder_flags"] == ["REFIT_IDENTICAL"]  # stripped weights come back identical
    assert cfg["builder_optimization_level"] == 5
    refit = P.BuildOptions(target="sm_89", refittable=True, weight_stripped=True).builder_config(None)
    assert refit["refittable"] and refit["strip_plan"] and refit["extra_builder_flags"] == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(target="sm_75"), "unsupported target 'sm_75'; use 'auto' .* sm_80, sm_86, sm_89, sm_90, sm_100, sm_120"),
    (dict(target="90"), "unsupported target '90'"),
    (dict(hardware_compatibility="turing"), "choose from none, ampere_plus, same_compute_capability"),
    (dict(workspace_gib=0), "workspace must be a positive number of GiB"),
    (dict(optimization_level=6), "optimization level must be an int in 0..5"),
    (dict(optimization_level=True), "optimization level must be an int in 0..5"),
    (dict(optimization_level=3.0), "optimization level must be an int in 0..5"),
    (dict(networks=()), "at least one network"),
])
def test_invalid_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        P.BuildOptions(**kwargs)


def test_auto_target_without_a_gpu_asks_for_one(bundle_dir, no_gpu):
    with pytest.raises(ValueError, match="there is none: name the GPU .* with --target"):
        P.plan_build(bundle_dir, P.BuildOptions())


def test_auto_target_takes_this_gpu(bundle_dir, monkeypatch):
    monkeypatch.setattr(P, "compute_capability", lambda: "sm_86")
    plan = P.plan_build(bundle_dir, P.BuildOptions(networks=("text_encoder",)))
    assert plan.target == "sm_86" and plan.network("text_encoder").engine == "engines/tensorrt/sm_86/text_encoder.plan"


def test_write_plan_is_atomic_valid_json(bundle_dir, no_gpu, tmp_path, monkeypatch):
    out = tmp_path / "plans" / "plan.json"
    plan = P.write_plan(bundle_dir, P.BuildOptions(target="sm_90"), out)
    assert json.loads(out.read_text()) == json.loads(plan.to_json())
    d = json.loads(out.read_text())
    assert d["plan_version"] == P.PLAN_VERSION and set(d["networks"]) == set(_manifest(bundle_dir)["graphs"])
    assert d["plugins"]["registration"] == "turbotrt.plugins.trt:register_plugins"
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr("turbotrt.core.files.os.fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        P.write_plan(bundle_dir, P.BuildOptions(target="sm_80"), out)
    assert json.loads(out.read_text())["target"] == "sm_90"  # the old plan, whole
    assert list(out.parent.iterdir()) == [out]


# --- the Polygraphy config generated from the plan ------------------------------------------------------

class _FakeTrt(SimpleNamespace):
    """The few TensorRT enums the loaders resolve plan names in (values as TensorRT numbers them)."""

    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", dict(
        STRONGLY_TYPED=1, PREFER_JIT_PYTHON_PLUGINS=2, PREFER_AOT_PYTHON_PLUGINS=3))
    OnnxParserFlag = enum.IntEnum("OnnxParserFlag", dict(NATIVE_INSTANCENORM=0, ENABLE_PLUGIN_OVERRIDE=3))
    MemoryPoolType = enum.IntEnum("MemoryPoolType", dict(WORKSPACE=0))
    HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", dict(
        NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2))
    BuilderFlag = enum.IntEnum("BuilderFlag", dict(REFIT=6, STRIP_PLAN=19, REFIT_IDENTICAL=20))


def test_polygraphy_config_is_generated_from_the_plan(bundle_dir, no_gpu, tmp_path):
    pytest.importorskip("polygraphy", reason="the build loaders are Polygraphy's")
    from polygraphy.backend.trt import CreateConfig, PostprocessConfig

    trt = _FakeTrt(__version__="10.13.0")
    opts = P.BuildOptions(target="sm_90", workspace_gib=2, hardware_compatibility="ampere_plus", refittable=True,
                          optimization_level=4, timing_cache_dir=str(tmp_path))
    plan = P.plan_build(bundle_dir, opts, tensorrt_version="10.13.0")
    net = plan.network("dit")
    config = T.config_loader(net, trt)
    assert isinstance(config, CreateConfig)  # Polygraphy accepts every argument the plan produces
    assert config.memory_pool_limits == {trt.MemoryPoolType.WORKSPACE: 2 * 2**30}
    assert config.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert config.refittable and not config.strip_plan and config.builder_optimization_level == 4
    assert config.timing_cache_path == str(tmp_path / "sm_90-trt10.13.0.cache") and not config.tf32
    (profile,) = config.profiles
    assert {n: tuple(s.min) for n, s in profile.items()} == net.shapes
    assert all(tuple(s.min) == tuple(s.opt) == tuple(s.max) for s in profile.values())

    stripped = P.plan_build(bundle_dir, P.BuildOptions(target="sm_90", weight_stripped=True),
                            tensorrt_version="10.13.0")
    assert isinstance(T.config_loader(stripped.network("text_encoder"), trt), PostprocessConfig)

    loader = T.engine_loader(net, bundle_dir, trt)
    assert loader.timing_cache_path == config.timing_cache_path
    network = T.network_loader(net, bundle_dir)
    assert network.path == str(bundle_dir / "dit.onnx")
    mask = T.network_flags_mask(network.network_flags, trt)
    assert mask == (1 << 1) | (1 << 3)
    # TensorRT 11 networks are always strongly typed and deprecate the flag
    assert T.network_flags_mask(network.network_flags, _FakeTrt(**vars(trt) | {"__version__": "11.4.0"})) == 1 << 3
    assert T.parser_flags_mask(("NATIVE_INSTANCENORM", "ENABLE_PLUGIN_OVERRIDE"), trt) == 0b1001
    with pytest.raises(P.BuildError, match="no ONNX parser flag ADJUST_FOR_DLA; TensorRT >= 10.9"):
        T.parser_flags_mask(("ADJUST_FOR_DLA",), trt)


# --- building, up to the TensorRT call -------------------------------------------------------------------

def test_build_without_tensorrt_points_to_the_dry_run(bundle_dir, monkeypatch, no_gpu):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as where TensorRT is not installed
    before = (bundle_dir / MANIFEST).read_text()
    with pytest.raises(P.BuildError) as e:
        T.build_engines(bundle_dir, P.BuildOptions(target="sm_90"))
    msg = str(e.value)
    assert "`tensorrt` Python package" in msg and "an NVIDIA GPU" in msg and "--dry-run" in msg
    assert (bundle_dir / MANIFEST).read_text() == before and not (bundle_dir / "engines").exists()


@pytest.fixture
def fake_build(monkeypatch):
    """TensorRT and a GPU stood in for: what reaches TensorRT is recorded, the 'engine' is its plan JSON."""
    built = []

    def engine_bytes(net, root, trt):
        built.append((net, root))
        return json.dumps(net.to_dict()).encode()

    state = SimpleNamespace(gpu="sm_90", trt=_FakeTrt(__version__=TRT_VERSION), built=built, registered=0)

    def register():
        state.registered += 1

    monkeypatch.setattr(T, "_import_tensorrt", lambda: state.trt)
    monkeypatch.setattr(T, "compute_capability", lambda: state.gpu)
    monkeypatch.setattr(P, "compute_capability", lambda: state.gpu)
    monkeypatch.setattr(T, "_engine_bytes", engine_bytes)
    monkeypatch.setattr("turbotrt.plugins.trt.register_plugins", register)
    return state


def test_build_saves_engines_and_records_them_in_the_manifest(bundle_copy, fake_build, tmp_path):
    networks = ("text_encoder", "vae_decode_first")
    plan_out = tmp_path / "built-plan.json"
    result = T.build_engines(bundle_copy, P.BuildOptions(networks=networks, timing_cache_dir=str(tmp_path)),
                             log=lambda *_: None, plan_out=plan_out)
    assert result.plan.target == "sm_90" and result.plan.build_gpu == "sm_90"
    assert [n.network for n, _ in fake_build.built] == list(networks)
    assert fake_build.registered == 0  # no SageSLA in these graphs
    assert json.loads(plan_out.read_text())["tensorrt"]["version"] == TRT_VERSION
    bundle = Bundle.load(bundle_copy, verify=True)  # every hash, the engines' included, checks out
    for network in networks:
        (entry,) = bundle.manifest.engines[network]
        path = bundle.engine(network, "tensorrt", "sm_90", TRT_VERSION)
        assert path == bundle_copy / f"engines/tensorrt/sm_90/{network}.plan"
        assert json.loads(path.read_bytes())["network"] == network
        assert entry.sha256 == bundle.manifest.files[entry.file] and entry.bytes == path.stat().st_size
        assert entry.target == "sm_90" and entry.library_version == TRT_VERSION and entry.flavour == "tensorrt"
        assert entry.details["plugin_ptx_sha256"] is None and entry.hardware_compatibility == "none"
        assert not entry.details["weight_stripped"] and entry.details["profile"] == bundle.profile.name
        assert entry.attention == "none"
    assert list((bundle_copy / "engines/tensorrt/sm_90").iterdir()) == [bundle_copy / f"engines/tensorrt/sm_90/{n}.plan"
                                                                for n in sorted(networks)]
    with pytest.raises(BundleError, match="no tensorrt engine for dit"):
        bundle.engine("dit", "tensorrt", "sm_90", TRT_VERSION)

    # A rebuild with another TensorRT overwrites the plan file, so it replaces that entry.
    fake_build.trt = _FakeTrt(__version__="10.14.1")
    T.build_engines(bundle_copy, P.BuildOptions(networks=("text_encoder",), timing_cache=False), log=lambda *_: None)
    bundle = Bundle.load(bundle_copy, verify=True)
    assert [e.library_version for e in bundle.manifest.engines["text_encoder"]] == ["10.14.1"]
    with pytest.raises(BundleError, match="built for sm_90 / tensorrt 10.14.1"):
        bundle.engine("text_encoder", "tensorrt", "sm_90", TRT_VERSION)
    assert bundle.manifest.engines["vae_decode_first"][0].library_version == TRT_VERSION

    # An engine file deleted by hand is forgotten, not reported as a broken bundle, when building again.
    (bundle_copy / "engines/tensorrt/sm_90/vae_decode_first.plan").unlink()
    T.build_engines(bundle_copy, P.BuildOptions(networks=("text_encoder",), timing_cache=False), log=lambda *_: None)
    bundle = Bundle.load(bundle_copy, verify=True)
    assert "vae_decode_first" not in bundle.manifest.engines
    assert "engines/tensorrt/sm_90/vae_decode_first.plan" not in bundle.manifest.files


def test_build_refuses_another_gpu_without_hardware_compatibility(bundle_copy, fake_build):
    fake_build.gpu = "sm_89"
    with pytest.raises(P.BuildError, match="this GPU is sm_89 but the target is sm_90.*ampere_plus"):
        T.build_engines(bundle_copy, P.BuildOptions(target="sm_90", networks=("text_encoder",)))
    assert fake_build.built == []
    opts = P.BuildOptions(target="sm_90", networks=("text_encoder",), hardware_compatibility="ampere_plus")
    result = T.build_engines(bundle_copy, opts, log=lambda *_: None)
    entry = result.engines["text_encoder"]
    assert entry.target == "sm_90" and entry.details["build_gpu"] == "sm_89"
    assert entry.hardware_compatibility == "ampere_plus"
    # the SageSLA kernel is compiled for the building GPU, so the DiT cannot be built for another one
    with pytest.raises(P.BuildError, match="PTX for the GPU that builds \\(sm_89\\)"):
        T.build_engines(bundle_copy, P.BuildOptions(target="sm_90", networks=("dit",),
                                                    hardware_compatibility="ampere_plus"))


def test_build_stops_on_plan_problems_before_touching_the_bundle(bundle_copy, fake_build):
    before = (bundle_copy / MANIFEST).read_text()
    with pytest.raises(P.BuildError, match="dit: no SageSLA kernel for sm_90"):
        T.build_engines(bundle_copy, P.BuildOptions(), log=lambda *_: None)
    assert fake_build.built == [] and fake_build.registered == 0
    assert (bundle_copy / MANIFEST).read_text() == before and not (bundle_copy / "engines").exists()


def test_build_checks_the_bundle_and_tensorrt_version(bundle_copy, fake_build):
    with pytest.raises(P.BuildError, match="--tensorrt-version 10.9.0 was given, but this TensorRT is 10.13.0"):
        T.build_engines(bundle_copy, P.BuildOptions(tensorrt_version="10.9.0", networks=("text_encoder",)))
    (bundle_copy / "text_encoder.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="text_encoder.onnx changed since export"):
        T.build_engines(bundle_copy, P.BuildOptions(networks=("text_encoder",)))


# --- SageSLA PTX for a geometry the kernels are built for -------------------------------------------------

def _sagesla_bundle(root: Path, quant: str) -> Bundle:
    """A one-node graph of the op at the kernels' geometry, with a manifest naming its inputs."""
    B, H, L, D, n = 1, 2, 256, 128, 2
    attrs = C.SageSLAAttrs(block_q=128, block_k=64, kept_blocks=n, sm_scale=D**-0.5, quant=quant)
    q_shape, idx_shape, red = [B, H, L, D], [B, H, C.cdiv(L, 128), n], [B, H, 1, D]
    shapes = dict(q=q_shape, k=q_shape, v=q_shape, block_idx=idx_shape, k_mean=red, v_amax=red)
    types = dict(q=TensorProto.FLOAT16, k=TensorProto.FLOAT16, v=TensorProto.FLOAT16, block_idx=TensorProto.INT32,
                 k_mean=TensorProto.FLOAT, v_amax=TensorProto.FLOAT)
    node = helper.make_node(C.OP_TYPE, list(C.INPUT_NAMES), ["o_s"], domain=C.DOMAIN, name="attn", **attrs.to_onnx())
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, types[k], shapes[k]) for k in shapes],
                              [helper.make_tensor_value_info("o_s", TensorProto.FLOAT16, q_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(C.DOMAIN, 1)])
    root.mkdir()
    onnx.save(model, root / "attn.onnx")
    dtype = {TensorProto.FLOAT16: "float16", TensorProto.INT32: "int32", TensorProto.FLOAT: "float32"}
    spec = GraphSpec("attn", tuple(IOSpec(k, tuple(shapes[k]), dtype[types[k]]) for k in shapes),
                     (IOSpec("o_s", tuple(q_shape), "float16"),), "fp16", Tolerance(0, 0, 1))
    cfg = get_config("wan-tiny")
    manifest = Manifest(cfg, default_profile(cfg), AttentionConfig("sagesla"), "fp16", Sampler.for_model(cfg),
                        {"attn": GraphEntry("attn.onnx", None, spec)})
    return Bundle(root, manifest)


def test_plan_records_the_ptx_the_plugin_embeds(tmp_path):
    pytest.importorskip("triton", reason="the SageSLA PTX is compiled by Triton")
    from turbotrt.plugins import trt as plugin
    from turbotrt.plugins.sagesla import aot

    bundle = _sagesla_bundle(tmp_path / "b", "int8_fp16")
    plan = P.plan_build(bundle, P.BuildOptions(target="sm_80", timing_cache=False))
    (use,) = plan.network("attn").plugins
    (kernel,) = use.kernels
    if kernel["status"] == "unavailable":
        pytest.skip(f"Triton's compiler is not usable here: {kernel['reason']}")
    assert plan.problems == () and kernel["status"] == "ok"
    assert [t["tactic"] for t in kernel["ptx"]] == plugin.tactics_for("int8_fp16")
    for t in kernel["ptx"]:  # the same compilation the plugin's aot_impl runs for that tactic
        warps, stages = plugin.tactic_config(t["tactic"], 128, 128)
        k = aot.compile_ptx("sm_80", 128, 64, 128, "int8_fp16", "float16", sm_scale=128**-0.5,
                            num_warps=warps, num_stages=stages)
        assert t["sha256"] == k.sha256 and t["ptx_target"] == "sm_80" and t["ptx_version"] == k.ptx_version
    assert len(use.ptx_sha256) == 64
    entry = T.engine_entry(plan, plan.network("attn"), "0" * 64, 1)
    assert entry.details["plugin_ptx_sha256"] == use.ptx_sha256 and entry.attention == "sagesla-plugin"
    assert entry.details["plugin_ptx"] == [dict(plugin=C.PLUGIN_NAME, kernel_target="sm_80",
                                                ptx_versions=[kernel["ptx"][0]["ptx_version"]])]


def test_fp8_sagesla_on_a_gpu_without_fp8_is_a_plan_problem(tmp_path):
    bundle = _sagesla_bundle(tmp_path / "b", "int8_fp8")
    plan = P.plan_build(bundle, P.BuildOptions(target="sm_86", timing_cache=False))
    assert any("sm_86 has no FP8" in p and "--v-dtype" in p for p in plan.problems)


# --- command line ---------------------------------------------------------------------------------------

def test_cli_dry_run_writes_the_plan(bundle_dir, no_gpu, tmp_path):
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["build", str(bundle_dir), "--dry-run", "--target", "sm_90", "--plan-out", str(out),
                                  "--workspace-gib", "4", "--tensorrt-version", "10.13.0",
                                  "--timing-cache", str(tmp_path / "tc"), "--refittable"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["target"] == "sm_90" and d["options"]["refittable"] and d["tensorrt"]["version"] == "10.13.0"
    assert d["networks"]["dit"]["config"]["memory_pool_limits"] == {"WORKSPACE": 4 * 2**30}
    assert d["networks"]["dit"]["config"]["timing_cache"] == str(tmp_path / "tc" / "sm_90-trt10.13.0.cache")
    assert "a build would stop on" in r.output  # the tiny DiT's 64x64 blocks

    r = CliRunner().invoke(main, ["build", str(bundle_dir), "--dry-run", "--target", "sm_89",
                                  "--network", "text_encoder"])
    assert r.exit_code == 0 and list(json.loads(r.stdout)["networks"]) == ["text_encoder"]


def test_cli_errors_and_help(bundle_dir, monkeypatch, no_gpu):
    r = CliRunner().invoke(main, ["build", str(bundle_dir), "--dry-run", "--target", "sm_70"])
    assert r.exit_code != 0 and "sm_80, sm_86, sm_89, sm_90, sm_100, sm_120" in r.output
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = CliRunner().invoke(main, ["build", str(bundle_dir), "--target", "sm_90"])
    assert r.exit_code != 0 and "--dry-run" in r.output
    r = CliRunner().invoke(main, ["build", "--help"])
    assert r.exit_code == 0
    for text in ("--dry-run", "strongly typed", "--hardware-compatibility", "--weight-stripped", "engines/<runtime>/<target>", "tensorrt-rtx"):
        assert text in r.output


# --- with TensorRT and a GPU ------------------------------------------------------------------------------

@pytest.fixture
def tensorrt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here: engine builds are untested")
    from turbotrt.core.gpu import compute_capability

    if compute_capability() is None:
        pytest.skip("no NVIDIA GPU: engine builds need one")
    return trt


@pytest.mark.tensorrt
@pytest.mark.slow
def test_tensorrt_builds_text_and_vae_engines_that_match_onnxruntime(bundle_copy, tensorrt_gpu, tmp_path):
    import numpy as np

    from turbotrt.runtime.backends import OrtBackend, TrtBackend

    networks = ("text_encoder", "vae_decode_first")
    T.build_engines(bundle_copy, P.BuildOptions(networks=networks, timing_cache_dir=str(tmp_path)), log=print)
    bundle = Bundle.load(bundle_copy)
    trt_backend, ort = TrtBackend(bundle), OrtBackend(bundle, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for network in networks:
        feeds = {i.name: i.random(rng) for i in bundle.spec(network).inputs}
        want, got = ort.session(network).run(feeds), trt_backend.session(network).run(feeds)
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-2, atol=1e-2)


@pytest.mark.tensorrt
@pytest.mark.slow
def test_tensorrt_builds_the_dit_with_the_sagesla_aot_plugin(tensorrt_gpu, tmp_path):
    from turbotrt.export.api import export

    out = tmp_path / "bundle"
    export("wan-tiny", out, precision="fp16", attention="sagesla", block_q=128, block_k=64, v_dtype="fp16",
           validate=False, log=lambda *_: None)
    result = T.build_engines(out, P.BuildOptions(networks=("dit",), timing_cache_dir=str(tmp_path)), log=print)
    entry = result.engines["dit"]
    assert entry.details["plugin_ptx_sha256"] and (out / entry.file).stat().st_size == entry.bytes
    Bundle.load(out).engine("dit", "tensorrt", result.plan.target, tensorrt_gpu.__version__)
