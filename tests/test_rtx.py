"""Real engines in CI: TensorRT for RTX parses and builds every tiny bundle graph, no GPU needed.

Every graph kind (the DiT in fp32/fp16/bf16 with dense, sla and sagesla attention, calibrated INT8
and FP8, the text encoder, the VAE decode and encode step graphs, both I2V experts) is built for
sm_86, sm_89 and sm_120 (FP8: sm_89 and sm_120, where the builder has it). To keep CI short, each
graph is built once as one plan for its three targets (TensorRT for RTX compiles a plan for every
compute capability in the builder config); `turbotrt build --runtime tensorrt-rtx` itself, one
engine per target, is exercised end to end on the shared tiny bundle. Running engines needs a GPU.
Each lint rule is checked against the real parser and builder on a synthetic graph of its pattern.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from turbotrt.cli import main
from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import TurbotrtError

if os.environ.get("CI") == "true":
    import tensorrt_rtx  # noqa: F401  (CI installs the [rtx] extra: every run builds real engines)
else:
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed: pip install 'turbotrt[rtx]'")

from turbotrt.build.rtx import RtxOptions, build_plan_bytes, plan_rtx  # noqa: E402
from turbotrt.export.lint import lint_model  # noqa: E402

TARGETS = ("sm_86", "sm_89", "sm_120")
FP8_TARGETS = ("sm_89", "sm_120")
quiet = dict(log=lambda *_: None)


def _build(path, targets=TARGETS) -> bytes:
    return build_plan_bytes(path, targets, **quiet)


def _accelerators(plan: bytes) -> set[str]:
    """The compute capabilities a plan is compiled for, as its embedded program names them."""
    return set(re.findall(rb"sm(\d+)", b" ".join(re.findall(rb"accelerators=\{([^}]*)\}", plan))))


@pytest.fixture(scope="module")
def low_precision_dits(tmp_path_factory):
    """The tiny DiT in fp16 and bf16 with each attention, and the bf16 text encoder: graphs only."""
    from turbotrt.core.configs import AttentionConfig, default_profile, get_config
    from turbotrt.export import dit, text_encoder
    from turbotrt.export.networks import export_graph
    from turbotrt.models.t5 import random_t5_state_dict

    root = tmp_path_factory.mktemp("rtx-graphs")
    cfg = get_config("wan-tiny")
    weights = {"dit": dit.random_weights(cfg)}
    out = {}
    for precision in ("fp16", "bf16"):
        for mode in ("dense", "sla", "sagesla"):
            (net,) = dit.definitions(cfg, default_profile(cfg), AttentionConfig.for_model(cfg, mode), precision, weights)
            folder = root / f"{precision}-{mode}"
            folder.mkdir()
            out[f"dit {precision} {mode}"] = export_graph(net, folder / "dit.onnx")
    t5 = text_encoder.definition(cfg.text_encoder, "bf16", random_t5_state_dict(cfg.text_encoder, 0))
    (root / "t5").mkdir()
    out["text_encoder bf16"] = export_graph(t5, root / "t5" / "text_encoder.onnx")
    return out


def _bundle_graphs(tiny_bundle):
    graphs = {}
    for kind in ("sagesla", "sla", "dense", "i2v", "int8", "fp8"):
        b = Bundle.load(tiny_bundle(kind), verify=False)
        for network in b.networks:
            if kind in ("sla", "dense", "int8", "fp8") and not network.startswith("dit"):
                continue  # their text encoder and VAE are the sagesla bundle's, graph for graph
            graphs[f"{network} ({kind})"] = b.graph(network)
    return graphs


def test_every_graph_of_every_bundle_kind_builds_for_three_targets(tiny_bundle, low_precision_dits):
    graphs = {**_bundle_graphs(tiny_bundle), **low_precision_dits}
    expected = {"dit (sagesla)", "dit (sla)", "dit (dense)", "text_encoder (sagesla)", "vae_decode_first (sagesla)",
                "vae_decode_step (sagesla)", "dit_high (i2v)", "dit_low (i2v)", "vae_encode_first (i2v)",
                "vae_encode_step (i2v)", "dit (int8)", "dit (fp8)", "text_encoder bf16",
                *(f"dit {p} {m}" for p in ("fp16", "bf16") for m in ("dense", "sla", "sagesla"))}
    assert expected <= set(graphs)
    for name, path in sorted(graphs.items()):
        targets = FP8_TARGETS if "fp8" in name else TARGETS
        plan = _build(path, targets)
        assert _accelerators(plan) == {t.removeprefix("sm_").encode() for t in targets}, name
        assert len(plan) > 1 << 20, name  # weights and program, not an empty shell


def test_fp8_is_refused_before_building_where_the_gpu_has_none(tiny_bundle):
    bundle = Bundle.load(tiny_bundle("fp8"))
    plan = plan_rtx(bundle, RtxOptions(("sm_86", "sm_89"), networks=("dit",)))
    assert plan.problems == ("dit: FP8 Q/DQ needs sm_89 or newer; sm_86 has no FP8 (build this bundle for sm_89, "
                             "sm_120, sm_121, or calibrate with --mode int8 for sm_86)",)
    code = CliRunner().invoke(main, ["build", str(tiny_bundle("fp8")), "--runtime", "tensorrt-rtx", "--target", "sm_86",
                                     "--network", "dit"])
    assert code.exit_code == 1 and "FP8 Q/DQ needs sm_89 or newer" in code.output
    # ... and the builder itself agrees: that is not a rule of ours.
    with pytest.raises(TurbotrtError, match="HW-specific datatypes: fp8"):
        _build(bundle.graph("dit"), ("sm_86",))


def test_build_command_records_one_engine_per_target(tiny_bundle, tmp_path):
    b = shutil.copytree(tiny_bundle("sagesla"), tmp_path / "b")
    r = CliRunner().invoke(main, ["build", str(b), "--runtime", "tensorrt-rtx", "--target", "sm_86", "--target",
                                  "sm_120", "--network", "dit", "--network", "text_encoder"])
    assert r.exit_code == 0, r.output
    assert "SageSLA nodes run as their ONNX function body" in r.output
    bundle = Bundle.load(b)  # every hash, the engines' included
    for network, attention in (("dit", "function-body"), ("text_encoder", "none")):
        entries = bundle.manifest.engines[network]
        assert [(e.flavour, e.target, e.attention) for e in entries] == [
            ("tensorrt-rtx", "sm_86", attention), ("tensorrt-rtx", "sm_120", attention)]
        for e in entries:
            assert bundle.engine(network, "tensorrt-rtx", e.target, e.library_version) == b / e.file
            assert _accelerators((b / e.file).read_bytes()) == {e.target.removeprefix("sm_").encode()}
    with pytest.raises(TurbotrtError, match=r"--runtime tensorrt-rtx --target sm_89"):
        bundle.engine("dit", "tensorrt-rtx", "sm_89", entries[0].library_version)
    dry = CliRunner().invoke(main, ["build", str(b), "--runtime", "tensorrt-rtx", "--target", "sm_89", "--dry-run"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["networks"][0]["engine"].startswith("engines/tensorrt-rtx/sm_89/")


@pytest.mark.parametrize("args,message", [
    (("--target", "sm_90"), "sm_90/sm_100 are not RTX targets"),
    (("--target", "sm_75"), "sm_75 has no FP32 GEMM"),
    (("--target", "sm_89", "--refittable"), "--refittable apply to --runtime tensorrt only"),
    (("--target", "sm_89", "--hardware-compatibility", "ampere_plus"), "--hardware-compatibility apply"),
])
def test_build_options_that_tensorrt_for_rtx_cannot_honour_are_refused(tiny_bundle, args, message):
    r = CliRunner().invoke(main, ["build", str(tiny_bundle("sagesla")), "--runtime", "tensorrt-rtx", *args])
    assert r.exit_code in (1, 2) and message in r.output


def test_the_engine_holds_the_sparse_form_not_an_L_by_L_product(tmp_path):
    """At L=1024 tokens the dense engine's program has a [.., L, L] attention tensor; the SLA one has
    none: its attention tensors are the gathered key blocks (read from the plan, no GPU needed)."""
    from turbotrt.core.configs import AttentionConfig, get_config, shape_profile
    from turbotrt.export import dit
    from turbotrt.export.networks import export_graph

    cfg = get_config("wan-tiny")
    profile = shape_profile("tiny", 125, config=cfg)
    L = profile.seq_len()
    assert L == 1024
    weights = {"dit": dit.random_weights(cfg)}
    sizes = {}
    for mode in ("dense", "sla"):
        att = AttentionConfig.for_model(cfg, mode, topk=0.1)
        (net,) = dit.definitions(cfg, profile, att, "fp32", weights)
        (tmp_path / mode).mkdir()
        plan = _build(export_graph(net, tmp_path / mode / "dit.onnx"), ("sm_89",))
        shapes = [tuple(int(d) for d in m.split()) for m in re.findall(rb"dims=\{ ([0-9 ]+) \}", plan)]
        sizes[mode] = [s for s in shapes if sum(d >= L for d in s) >= 2]
    assert sizes["dense"], "the dense engine should hold an L x L attention tensor"
    assert sizes["sla"] == []


# --- each lint rule against the real parser and builder ------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), functions=(), domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=opsets, functions=list(functions))


def _vi(name, elem=TensorProto.FLOAT, shape=(4, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _clip_min_only():
    base = helper.make_tensor("base", TensorProto.INT64, [4, 8], np.arange(32, dtype=np.int64) - 16)
    lo = helper.make_tensor("lo", TensorProto.INT64, [], [8])
    nodes = [helper.make_node("Abs", ["base"], ["a"], name="abs"), helper.make_node("Clip", ["a", "lo"], ["c"], name="clip"),
             helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "cf"], ["y"])]
    return _model(nodes, [_vi("x")], [_vi("y")], [base, lo])


def _resize_antialias():
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1, name="resize")]
    return _model(nodes, [_vi("x", shape=(1, 1, 4, 8))], [_vi("y", shape=(1, 1, 8, 16))], [scales])


def _qdq_zero_point():
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dequant")]
    return _model(nodes, [_vi("x")], [_vi("y")], [s, zp])


def _layernorm_two_outputs():
    scale = helper.make_tensor("w", TensorProto.FLOAT, [8], [1.0] * 8)
    nodes = [helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"], name="ln")]
    return _model(nodes, [_vi("x")], [_vi("y"), _vi("mean", shape=(4, 1))], [scale])


def _reducemean_runtime_axes():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")]
    return _model(nodes, [_vi("x"), _vi("axes", TensorProto.INT64, (1,))], [_vi("y", shape=(4, 1))])


def _custom_without_body():
    nodes = [helper.make_node("SageSLA", ["x"], ["y"], domain="turbodiffusion", name="sagesla",
                              plugin_namespace="turbodiffusion")]
    return _model(nodes, [_vi("x")], [_vi("y")], domains=["turbodiffusion"])


def _topk(k: int):
    kt = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")]
    return _model(nodes, [_vi("x", shape=(1, 8192))], [_vi("v", shape=(1, k)), _vi("i", TensorProto.INT64, (1, k))], [kt])


def _function_name_clash():
    """The function body and the main graph both have a Constant named `val_1` (int64 [3] and float
    2.0); the main one comes after the call site: as on the 1.3B DiT, where the parser, caching
    constants by name, gave a later Pow the inlined body's int64 tensor as its exponent."""
    body = [helper.make_node("Constant", [], ["val_1"], value=helper.make_tensor("c", TensorProto.INT64, [3], [1, 2, 3])),
            helper.make_node("Cast", ["val_1"], ["vf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["vf"], ["r"], keepdims=0), helper.make_node("Add", ["a", "r"], ["out"])]
    fn = helper.make_function("custom", "F", ["a"], ["out"], body, [helper.make_opsetid("", 20)])
    nodes = [helper.make_node("F", ["x"], ["f"], domain="custom", name="f"),
             helper.make_node("Constant", [], ["val_1"], value=helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])),
             helper.make_node("Pow", ["f", "val_1"], ["y"], name="pow")]
    return _model(nodes, [_vi("x")], [_vi("y")], functions=[fn], domains=["custom"])


# (rule, synthetic graph, what the real builder says: a refusal message, or None where it builds and
#  the rule is kept for standard TensorRT's sake, with the reason in lint.py)
RULES = [
    ("integer Clip with only a lower bound", _clip_min_only, "Cannot convert scalar operand"),
    ("no antialiasing", _resize_antialias, "Antialiasing is not supported"),
    ("zero point must be a constant 0", _qdq_zero_point, "Non-zero zero point is not supported"),
    ("only the first output of LayerNormalization", _layernorm_two_outputs, "LayerNormalization"),
    ("axes must be an initializer/constant", _reducemean_runtime_axes, "build-time constant"),
    ("no local function body", _custom_without_body, "Plugin not found"),
    ("TopK K must be at most 3840", lambda: _topk(4096), "K exceeds the maximum value allowed"),
    ("body values share main-graph names", _function_name_clash, "Invalid Node - pow"),
]


@pytest.mark.parametrize("rule,make,refusal", RULES, ids=[r[0] for r in RULES])
def test_each_lint_rule_is_a_pattern_the_real_builder_refuses(tmp_path, rule, make, refusal):
    model = make()
    found = [str(f) for f in lint_model(model) if f.severity == "error"]
    assert any(rule in f for f in found), found
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    with pytest.raises(TurbotrtError, match=re.escape(refusal)):
        _build(path, ("sm_89",))


def test_rules_kept_for_standard_tensorrt_and_the_limits_edge(tmp_path):
    # TopK sorted=0: TensorRT for RTX builds it, standard TensorRT's parser wants sorted=1 (kept, see lint.py).
    model = _topk(8)
    model.graph.node[0].attribute.append(helper.make_attribute("sorted", 0))
    assert any("sorted=1" in str(f) for f in lint_model(model))
    onnx.save(model, tmp_path / "sorted0.onnx")
    _build(tmp_path / "sorted0.onnx", ("sm_89",))
    # K = 3840 exactly is allowed by both: no finding, and it builds.
    model = _topk(3840)
    assert not [f for f in lint_model(model) if f.severity == "error"]
    onnx.save(model, tmp_path / "k3840.onnx")
    _build(tmp_path / "k3840.onnx", ("sm_89",))


def test_validate_reports_what_the_rtx_parser_and_builder_say(tiny_bundle):
    from turbotrt.validation import validate_bundle

    lines = []
    result = validate_bundle(tiny_bundle("sagesla"), steps=1, log=lines.append)
    assert set(result.rtx) == {"dit", "text_encoder", "vae_decode_first", "vae_decode_step"}
    assert all(r["passed"] and r["target"] == "sm_89" for r in result.rtx.values())
    assert any(line.startswith("TensorRT for RTX") and "dit: parses and builds for sm_89" in line for line in lines)
