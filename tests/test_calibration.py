"""INT8/FP8 calibration into explicit Q/DQ graphs (turbotrt.calibration), on the tiny DiT, CPU only."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from turbotrt.calibration import observers as obs
from turbotrt.calibration.api import calibrate
from turbotrt.calibration.cache import CacheError, CalibrationCache, StaleCacheError, load_cache
from turbotrt.calibration.config import QuantConfig, QuantConfigError
from turbotrt.calibration.dataset import block_selections, build_calibration_set, load_embeddings
from turbotrt.calibration.quantize import conversion_error, fake_quant_activation, fake_quant_model, quantize_weight
from turbotrt.calibration.report import OrtDit, cosine, rel_error
from turbotrt.calibration.smoothquant import apply_smoothing, smooth_sites, smoothing_factors
from turbotrt.cli import main
from turbotrt.core.bundle import Bundle
from turbotrt.core.configs import AttentionConfig, get_config
from turbotrt.core.rcm import rcm_times, sde_step
from turbotrt.export import dit
from turbotrt.export.lint import lint, lint_model
from turbotrt.export.onnx_io import GraphWeights, float_state_dict
from turbotrt.models.int8 import dequantize_tiles, quantize_tiles
from turbotrt.models.wan import WanModel, init_random_

CFG = get_config("wan-tiny")
PROMPTS = ("a cat walks slowly", "a red bird flies over the river")
quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny GEMMs: two threads on a shared 2-core machine only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("sla")


@pytest.fixture(scope="module")
def int8(tiny_bundle):
    return tiny_bundle("int8"), tiny_bundle.report("int8")


@pytest.fixture(scope="module")
def fp8(tiny_bundle):
    return tiny_bundle("fp8"), tiny_bundle.report("fp8")


# --- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="int4"), "unknown quantization mode 'int4'"),
    (dict(observer="minmax"), "unknown observer 'minmax'"),
    (dict(mode="fp8", observer="entropy"), "for fp8 use max, percentile or mse"),
    (dict(percentile=0), "0 < p <= 100"),
    (dict(percentile=100.5), "0 < p <= 100"),
    (dict(smoothquant_alpha=1.5), "smoothquant_alpha must lie in [0, 1]"),
    (dict(steps=5), "1 to 4 steps"),
    (dict(seeds=()), "one or more non-negative ints"),
    (dict(seeds=(1, 1)), "seeds repeat"),
    (dict(seeds="0"), "must be a sequence"),
    (dict(prompts=()), "either prompts"),
    (dict(embeddings_digest="0" * 64), "not both"),
    (dict(num_bins=64), "num_bins must be an int >= 128"),
])
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(QuantConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        QuantConfig(**kwargs)


def test_config_hash_is_stable_and_gpu_independent():
    c = QuantConfig(prompts=("a cat",), seeds=[0, 1])
    assert c.observer == "percentile" and c.seeds == (0, 1)  # None resolves before hashing; lists become tuples
    # Pinned: the hash must not change between processes, machines or GPU targets.
    assert c.config_hash() == QuantConfig(prompts=["a cat"], seeds=(0, 1), observer="percentile").config_hash()
    assert c.config_hash() == "3ff3b456857f5776"
    assert QuantConfig(mode="fp8").observer == "max"
    others = [QuantConfig(prompts=("a cat",), seeds=(0, 1), **kw).config_hash()
              for kw in (dict(observer="max"), dict(percentile=99.9), dict(smoothquant_alpha=0.5), dict(steps=2))]
    assert len(set(others + [c.config_hash()])) == 5
    assert QuantConfig.from_dict(c.to_dict()) == c


# --- observers against hand-computed values ---------------------------------------------------------

def test_max_observer():
    o = obs.MaxObserver()
    o.observe(torch.tensor([0.5, -2.0]))
    o.observe(torch.tensor([[1.5, -0.25]]))
    assert o.amax() == 2.0


def test_percentile_on_a_small_histogram():
    hist, width = np.array([1.0, 1.0, 1.0, 1.0]), 0.5  # cumulative shares .25 .5 .75 1
    assert obs.percentile_amax(hist, width, 50.0) == 1.0  # reached at bin 1: its upper edge, 2 * 0.5
    assert obs.percentile_amax(hist, width, 60.0) == 1.5
    assert obs.percentile_amax(hist, width, 100.0) == 2.0


def test_entropy_on_a_small_histogram():
    # Two quantized levels, candidates of 2, 3 and 4 bins (width 1). By hand:
    # i=2: P=[4, 2+1+1]/8, Q=[4, 2]/6                    KL = .5 ln(.75) + .5 ln(1.5)       = 0.0589
    # i=3: P=[4, 2, 1+1]/8, Q: groups {0},{1,2} -> [4, 1.5, 1.5]/7  KL = .5 ln(.875) + .5 ln(7/6) = 0.0103
    # i=4: P=[4, 2, 1, 1]/8, Q: groups {0,1},{2,3} -> [3, 3, 1, 1]/8  KL = .5 ln(4/3) + .25 ln(2/3) = 0.0425
    # Minimum at i=3: threshold (3 + 0.5) bins.
    assert obs.entropy_amax(np.array([4.0, 2.0, 1.0, 1.0]), 1.0, levels=2) == pytest.approx(3.5)
    # An empty bin stays empty when a level is spread back (else Q would put mass where P has none):
    # i=2: P=[3, 2], Q=[3, 0] -> infinite; i=3: Q=[3, 0, 1]: KL = .6 ln(.8) + .4 ln(1.6) = 0.054;
    # i=4: Q=[3, 0, 1, 1] = P: KL = 0 -> 4.5. (Spreading over the empty bin too would pick i=3.)
    assert obs.entropy_amax(np.array([3.0, 0.0, 1.0, 1.0]), 1.0, levels=2) == pytest.approx(4.5)


def test_entropy_clips_a_rare_outlier_like_tensorrt():
    i = np.arange(2048)
    hist = np.round(1e6 * np.exp(-0.5 * (i / 200.0) ** 2))  # half-normal bulk, sigma = 200 bins
    hist[2047] = 1.0  # one outlier at the max
    amax = obs.entropy_amax(hist, 1.0)
    assert 600 < amax < 1100  # within 3 to 5.5 sigma: keeps the bulk, drops the outlier (max would be 2048)


def test_mse_on_a_small_histogram():
    # Centres 1.5 (10 values) and 7.5 (1 value); a 2-level grid {0, a/2, a}; candidates a = 1..8.
    # a=4: 1.5 -> 2 (err .25 x 10), 7.5 -> 4 (12.25): 14.75, the minimum (a=3: 20.25, a=5: 16.25, a=8: 22.75).
    hist = np.zeros(8)
    hist[1], hist[7] = 10.0, 1.0
    amax = obs.mse_amax(hist, 1.0, lambda v, a: obs.int_fake_quant(v, a, qmax=2.0))
    assert amax == 4.0


def test_histogram_grows_by_merging_bins_exactly():
    o = obs.HistogramObserver(4)
    o.observe(torch.tensor([0.1, -0.6, 0.9, 1.0]))  # range 1, width .25: bins 0, 2, 3, 3
    assert o.range == 1.0 and o.hist.tolist() == [1, 0, 1, 2]
    o.observe(torch.tensor([3.0]))  # range 1 -> 2 -> 4, pairs merge twice; 3.0 lands in the last bin
    assert o.range == 4.0 and o.hist.tolist() == [4, 0, 0, 1]


# --- SmoothQuant -----------------------------------------------------------------------------------

def test_smoothing_factor_formula():
    site = smooth_sites(1, 128, set(obs.quantized_linears(1)))[1]  # blocks.0.cross_attn.q
    assert site.name == "blocks.0.cross_attn.q"
    w = torch.zeros(4, 256)
    w[0, 0], w[0, 1] = 1.0, 4.0
    act = torch.ones(256)
    act[0], act[1] = 4.0, 1.0
    s = smoothing_factors(site, act, {"blocks.0.cross_attn.q.weight": w}, alpha=0.5)
    assert s[:2].tolist() == [2.0, 0.5]  # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)


@pytest.mark.parametrize("mode", ["sla", "dense"])
def test_smoothquant_folding_keeps_the_float_output(mode):
    model = init_random_(WanModel(CFG, AttentionConfig.for_model(CFG, mode))).eval()
    sd = {k: v.float() for k, v in model.state_dict().items()}
    sites = smooth_sites(CFG.num_layers, CFG.head_dim, set(obs.quantized_linears(CFG.num_layers)))
    assert {s.name for s in sites} == {"text_embedding", "blocks.0.cross_attn.q", "blocks.0.cross_attn.o",
                                       "blocks.0.self_attn.o", "blocks.1.cross_attn.q", "blocks.1.cross_attn.o",
                                       "blocks.1.self_attn.o"}
    g = torch.Generator().manual_seed(1)
    factors = {s.name: torch.exp(torch.randn(s.head_dim or CFG.dim, generator=g)) for s in sites}  # 0.1x .. 10x
    smoothed = WanModel(CFG, model.attention)
    smoothed.load_state_dict(apply_smoothing(sd, sites, factors))
    x, ctx = torch.randn(1, 16, 5, 8, 16, generator=g), torch.randn(1, 512, 64, generator=g)
    with torch.no_grad():
        ref, got = model(x, torch.tensor([932.0]), ctx), smoothed.eval()(x, torch.tensor([932.0]), ctx)
    # Exact rewrite: only fp32 rounding differs (measured ~3e-7 relative).
    assert rel_error(got, ref) < 1e-5


def test_self_attention_smoothing_must_respect_proj_l():
    # Dividing v's rows and multiplying o's columns alone (no proj_l fold, factors varying per head)
    # is exact for dense attention but not for SLA, whose proj_l mixes the channels of each head.
    g = torch.Generator().manual_seed(2)
    s = torch.exp(torch.randn(CFG.dim, generator=g))
    x, ctx = torch.randn(1, 16, 5, 8, 16, generator=g), torch.randn(1, 512, 64, generator=g)
    errors = {}
    for mode in ("sla", "dense"):
        model = init_random_(WanModel(CFG, AttentionConfig.for_model(CFG, mode))).eval()
        sd = {k: v.float().clone() for k, v in model.state_dict().items()}
        sd["blocks.0.self_attn.v.weight"] /= s[:, None]
        sd["blocks.0.self_attn.v.bias"] /= s
        sd["blocks.0.self_attn.o.weight"] *= s[None, :]
        naive = WanModel(CFG, model.attention)
        naive.load_state_dict(sd)
        with torch.no_grad():
            errors[mode] = rel_error(naive.eval()(x, torch.tensor([932.0]), ctx), model(x, torch.tensor([932.0]), ctx))
    assert errors["dense"] < 1e-5 and errors["sla"] > 1e-2


# --- the Q/DQ graph ----------------------------------------------------------------------------------

def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _init(model, name):
    return next((t for t in model.graph.initializer if t.name == name), None)


def _check_placement(model, mode):
    """Every quantized MatMul: activation Q->DQ (per tensor, zp 0) and a DQ'd low-precision weight
    initializer ([in, out], per output channel for int8); no other node touches a Q/DQ."""
    quantized = set(obs.quantized_linears(CFG.num_layers))
    qtype = TensorProto.INT8 if mode == "int8" else TensorProto.FLOAT8E4M3FN
    prod = _producers(model)
    seen, qdq_users = set(), 0
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        act, wgt = prod.get(node.input[0]), prod.get(node.input[1])
        linear = node.name.split("/")[0]
        if linear not in quantized:  # attention products, proj_l, embeddings, head: float inputs
            assert not (act and act.op_type == "DequantizeLinear") and not (wgt and wgt.op_type == "DequantizeLinear"), node.name
            continue
        seen.add(linear)
        assert act.op_type == "DequantizeLinear" and prod[act.input[0]].op_type == "QuantizeLinear", node.name
        q = prod[act.input[0]]
        assert q.input[1] == act.input[1] and q.input[2] == act.input[2]  # one scale, one zero point
        scale, zp = _init(model, q.input[1]), _init(model, q.input[2])
        assert list(scale.dims) == [] and list(zp.dims) == [] and zp.data_type == qtype
        assert not onnx.numpy_helper.to_array(zp).astype(np.float32).any()
        assert wgt.op_type == "DequantizeLinear"
        w, ws, wzp = (_init(model, i) for i in wgt.input)
        assert w.data_type == qtype and w.name == f"{linear}.weight_quantized"
        out_features = {"ffn.0": CFG.ffn_dim}.get(linear.split(".", 2)[2], CFG.dim)
        assert list(w.dims)[1] == out_features  # [in, out]: the MatMul's B, no Transpose left
        axis = {a.name: onnx.helper.get_attribute_value(a) for a in wgt.attribute}.get("axis")
        if mode == "int8":
            assert axis == 1 and list(ws.dims) == [out_features] and list(wzp.dims) == [out_features]
        else:
            assert list(ws.dims) == [] and list(wzp.dims) == []
        assert not onnx.numpy_helper.to_array(wzp).astype(np.float32).any()
        qdq_users += 1
    assert seen == quantized and qdq_users == len(quantized)
    # No Q/DQ elsewhere: every Q feeds a DQ, every DQ feeds quantized MatMuls only.
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert [c.op_type for c in consumers[n.output[0]]] == ["DequantizeLinear"]
        if n.op_type == "DequantizeLinear":
            assert all(c.op_type == "MatMul" and c.name.split("/")[0] in quantized for c in consumers[n.output[0]])
    # Weights of quantized Linears are gone as floats; everything else kept its float weights.
    names = {t.name for t in model.graph.initializer}
    assert not any(f"{n}.weight" in names for n in quantized)
    assert {"head.head.weight", "patch_embedding.weight", "blocks.0.self_attn.attn_op.local_attn.proj_l.weight"} <= names


@pytest.mark.parametrize("which", ["int8", "fp8"])
def test_qdq_placement_follows_tensorrt_rules(which, int8, fp8):
    out = {"int8": int8, "fp8": fp8}[which][0]
    model = onnx.load(str(out / "dit.onnx"), load_external_data=False)
    _check_placement(model, which)
    n_quant = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    # Shared inputs share one pair: per block q/k/v (1), self o, cross q, cross o, ffn.0, ffn.2 = 6;
    # the text embedding feeds every block's cross k/v: 1 more.
    assert n_quant == 6 * CFG.num_layers + 1
    assert [str(f) for f in lint_model(model) if f.severity == "error"] == []
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer if t.name.endswith("weight_quantized"))
    onnx.checker.check_model(onnx.load(str(out / "dit.onnx")), full_check=True)


def _fake_quant_from_cache(bundle_dir, out, mode):
    b = Bundle.load(bundle_dir)
    names = obs.quantized_linears(CFG.num_layers)
    with torch.device("meta"):
        keys = list(WanModel(CFG).state_dict())
    sd = float_state_dict(GraphWeights(b.graph("dit"), b.data("dit").name), keys)
    model = dit.reference_model(CFG, b.attention, sd)
    cache = load_cache(out / "calibration_cache.json")
    weights = {n: quantize_weight(sd[f"{n}.weight"], mode) for n in names}
    return model, fake_quant_model(model, weights, cache.amax, mode)


@pytest.mark.parametrize("which", ["int8", "fp8"])
def test_qdq_graph_in_onnxruntime_matches_fake_quant_and_float(which, bundle, int8, fp8):
    out, report = {"int8": int8, "fp8": fp8}[which]
    _, fq = _fake_quant_from_cache(bundle, out, which)
    ort = OrtDit(out / "dit.onnx", CFG)
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(1, 16, 5, 8, 16, generator=g), torch.randn(1, 512, 64, generator=g)
    for t in (988.0, 608.0):
        ts = torch.tensor([[t]])
        with torch.no_grad():
            got, want = ort(x, ts, ctx), fq(x, ts, ctx)
        # Node for node the Q/DQ math is identical (test below: ~3e-7). End to end, the float
        # graph's own ORT-vs-torch difference (~5e-7, summation order) moves a few values across
        # a Q rounding boundary, each flip a whole quantization step: measured 1e-4 .. 3.5e-3.
        assert cosine(got, want) > 0.9999 and rel_error(got, want) < 5e-3
        # (No bound to float here: random inputs lie outside the calibrated ranges and clip.)
    # Against float on what the model really sees: the report's held-out trajectories, per step and
    # after the loop. Per-tensor 8-bit activations through 20 GEMMs of a random model: measured
    # 1.0-1.6% relative error (int8 / max, fp8 / max: e4m3 keeps 3 mantissa bits), bound 3%, where
    # SLA kept the float model's block selection. Where quantized q/k change SLA's top-k choice
    # (1 of 3 key blocks kept on this geometry) a whole key block is swapped: measured up to 5%, bound 8%.
    _check_quality(report, steps=4 if which == "int8" else 2)


def _check_quality(report, steps, typical=True):
    assert len(report.per_step) == 2 * steps and len(report.final_latent) == 2
    for q in report.per_step + report.final_latent:
        assert q.cosine_min > 0.998 and q.rel_error_max < 8e-2, q
    for q in report.per_step:
        if q.backend == "pytorch-fakequant":
            assert q.sla_rows_changed is not None
            if q.sla_rows_changed == 0:
                assert q.cosine_min > 0.9995 and q.rel_error_max < 3e-2, q
    if typical:  # over several steps, a swapped block is the exception
        assert np.median([q.rel_error_mean for q in report.per_step]) < 3e-2
    by = {(q.backend, q.step): q for q in report.per_step}
    for (backend, step), q in by.items():
        if backend == "onnxruntime":
            assert abs(q.rel_error_mean - by[("pytorch-fakequant", step)].rel_error_mean) < 1e-3


@pytest.mark.parametrize("which", ["int8", "fp8"])
def test_each_quantized_matmul_equals_its_fake_quant_linear(which, bundle, int8, fp8):
    """Q -> DQ -> MatMul <- DQ(W) of every Linear, cut out of the graph, on the very input the
    fake-quant model's Linear sees: the same numbers up to fp32 summation order."""
    out = {"int8": int8, "fp8": fp8}[which][0]
    _, fq = _fake_quant_from_cache(bundle, out, which)
    model = onnx.load(str(out / "dit.onnx"))
    prod, inits = _producers(model), {t.name: t for t in model.graph.initializer}
    captured = {}
    names = obs.quantized_linears(CFG.num_layers)
    for n in names:
        fq.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: captured.__setitem__(n, a[0].detach()))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fq(torch.randn(1, 16, 5, 8, 16, generator=g), torch.tensor([[988.0]]), torch.randn(1, 512, 64, generator=g))
    for n in names:
        mm = next(x for x in model.graph.node if x.op_type == "MatMul" and x.name.startswith(n + "/"))
        act_dq = prod[mm.input[0]]
        nodes = [prod[act_dq.input[0]], act_dq, prod[mm.input[1]], mm]
        used = list({i: inits[i] for nd in nodes for i in nd.input if i in inits}.values())
        x_name = nodes[0].input[0]
        sub = onnx.helper.make_model(onnx.helper.make_graph(
            nodes, n, [onnx.helper.make_tensor_value_info(x_name, TensorProto.FLOAT, None)],
            [onnx.helper.make_tensor_value_info(mm.output[0], TensorProto.FLOAT, None)], used),
            opset_imports=model.opset_import)
        got = ort_session_from(sub).run(None, {x_name: captured[n].numpy()})[0]
        lin = fq.get_submodule(n)
        want = fake_quant_activation(captured[n], lin.input_amax, which) @ lin.weight.T
        assert rel_error(got, want) < 1e-5, n  # measured ~3e-7


def ort_session_from(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_report_lists_quantized_and_skipped_layers(int8):
    out, report = int8
    assert sorted(report.quantized) == sorted(obs.quantized_linears(CFG.num_layers))
    assert set(report.skipped) == {"patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                   "time_embedding.2", "time_projection.1", "head.head",
                                   "blocks.0.self_attn.attn_op.local_attn.proj_l",
                                   "blocks.1.self_attn.attn_op.local_attn.proj_l"}
    assert "proj_l" in report.skipped["blocks.0.self_attn.attn_op.local_attn.proj_l"]
    saved = json.loads((out / "quant_report.json").read_text())
    assert saved["config_hash"] == report.config_hash and saved["evaluated_on"].endswith("(held-out seeds)")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["mode"] == "int8" and manifest["quantization"]["config_hash"] == report.config_hash
    # A complete bundle: the other graphs and the tokenizer came along, every file hash matches.
    loaded = Bundle.load(out, verify=True)
    assert set(manifest["graphs"]) <= {p.split(".")[0] for p in manifest["files"]}
    assert "calibration_cache.json" in manifest["files"] and loaded.manifest.lint["dit"] == []


def test_smoothquant_calibration_folds_into_the_graph(bundle):
    out = bundle.parent / "int8_sq"
    report = calibrate(bundle, out, mode="int8", observer="max", smoothquant=0.5, prompts=PROMPTS[:1], steps=1,
                       seeds=(0,), **quiet)
    assert sorted(report.smoothquant["folded"]) == sorted(s.name for s in smooth_sites(CFG.num_layers, CFG.head_dim,
                                                                                         set(report.quantized)))
    assert "time projection" in report.smoothquant["skipped"]["blocks.0.ffn.0"]
    # norm3 and proj_l changed in the graph (folded), so ONNX Runtime agrees with the fake-quant model only if
    # the folds reached the graph; the report compares both with the float model.
    ort = next(q for q in report.per_step if q.backend == "onnxruntime")
    fq = next(q for q in report.per_step if q.backend == "pytorch-fakequant")
    assert abs(ort.rel_error_mean - fq.rel_error_mean) < 1e-3  # both see the same folded weights
    _check_quality(report, steps=1, typical=False)
    cache = load_cache(out / "calibration_cache.json")
    assert set(cache.smoothing) == set(report.smoothquant["folded"])


# --- cache ---------------------------------------------------------------------------------------------

def test_cache_round_trips_and_reuse_rebuilds_the_same_graph(bundle, int8, tmp_path):
    out, _ = int8
    path = out / "calibration_cache.json"
    cache = load_cache(path, QuantConfig(observer="max", prompts=PROMPTS, steps=4), "wan-tiny")
    d = json.loads(path.read_text())
    assert d["method"] == "max" and d["model_preset"] == "wan-tiny" and len(d["tensors"]) == 20
    assert all(k.endswith(".input") for k in d["tensors"])
    assert not any(k in json.dumps(d) for k in ("sm_", "gpu", "cuda"))  # nothing about the target
    again = tmp_path / "c.json"
    cache.save(again)
    assert load_cache(again).to_dict() == cache.to_dict()
    rebuilt = tmp_path / "from_cache"
    calibrate(bundle, rebuilt, mode="int8", observer="max", prompts=PROMPTS, steps=4, cache=path, evaluate=False, **quiet)
    a = onnx.load(str(out / "dit.onnx"))
    b = onnx.load(str(rebuilt / "dit.onnx"))
    scales = lambda m: {t.name: onnx.numpy_helper.to_array(t).tolist() for t in m.graph.initializer if t.name.endswith("_scale")}
    assert scales(a) == scales(b)


def test_stale_cache_is_refused_with_a_clear_message(bundle, int8, tmp_path):
    path = int8[0] / "calibration_cache.json"
    with pytest.raises(StaleCacheError, match=r"calibrated with config [0-9a-f]{16}.*differs in: observer"):
        load_cache(path, QuantConfig(observer="percentile", prompts=PROMPTS, steps=4))
    with pytest.raises(StaleCacheError, match="differs in: observer"):
        calibrate(bundle, tmp_path / "x", observer="percentile", prompts=PROMPTS, cache=path, evaluate=False, **quiet)
    with pytest.raises(StaleCacheError, match="not 'wan-tiny-i2v'"):
        load_cache(path, preset="wan-tiny-i2v")
    edited = json.loads(path.read_text())
    edited["config"]["percentile"] = 50.0
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(CacheError, match="edited by hand"):
        load_cache(tmp_path / "edited.json")
    assert not (tmp_path / "x").exists()


def test_cache_rejects_nonpositive_amax(tmp_path):
    c = CalibrationCache(QuantConfig(prompts=("a",)), "wan-tiny", {"blocks.0.ffn.0": 1.0})
    d = c.to_dict()
    d["tensors"]["blocks.0.ffn.0.input"]["amax"] = 0.0
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(CacheError, match="bad entry"):
        load_cache(tmp_path / "c.json")


# --- -quant checkpoints: 128x128 tiles -> per output channel ------------------------------------------

def test_tile_to_per_channel_conversion_error_bound():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 520, generator=g) / 20  # partial edge tiles on both axes
    w[:128, :128] *= 8  # one coarse tile: its rows' per-channel grid is 8x coarser for their other tiles
    codes, tile_scale = quantize_tiles(w)
    qw = quantize_weight(dequantize_tiles(codes, tile_scale), "int8")  # what calibration does with -quant tiles
    err = conversion_error(dequantize_tiles(codes, tile_scale), qw)
    w_tile = codes.float() * tile_scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :520]
    per_row = (qw.dequantize() - w_tile).abs().amax(dim=1)
    step = w_tile.abs().amax(dim=1) / 127  # per-channel scale
    # Round to nearest on a grid covering the row: at most half a step, per row (fp32 slack 1e-6).
    ulp = 2 * torch.finfo(torch.float32).eps * float(w_tile.abs().max())  # fp32 rounding of codes * scale
    assert bool((per_row <= step / 2 + ulp).all()) and err.within_bound
    assert float((per_row / (step / 2)).max()) > 0.9  # and the bound is tight, not loose
    assert qw.codes.dtype == torch.int8 and int(qw.codes.abs().max()) <= 127 and qw.scale.shape == (300,)
    # Against the original float weights: the tile error (<= s_tile/2) plus the conversion's.
    tile_half = tile_scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :520] / 2
    assert bool(((qw.dequantize() - w).abs() <= tile_half + step[:, None] / 2 + 1e-7).all())
    # Fine tiles sharing rows with the coarse one get that row's 8x coarser grid: ~8x the error.
    err_fine = (qw.dequantize() - w_tile)[:, 128:].pow(2).mean(dim=1).sqrt()
    assert float(err_fine[:128].mean()) > 4 * float(err_fine[128:].mean())


def test_calibrating_from_a_quant_checkpoint_starts_from_its_tiles(bundle, tmp_path):
    from turbotrt.models.checkpoint import save_state_dict
    from turbotrt.models.wan import random_wan_state_dict

    ckpt = tmp_path / "tiny-quant.safetensors"
    save_state_dict(random_wan_state_dict(CFG, seed=0, dtype="fp32", quantized=True), ckpt)
    report = calibrate(bundle, tmp_path / "q", observer="max", prompts=PROMPTS[:1], steps=1, checkpoint=ckpt,
                       evaluate=False, **quiet)
    conv = report.weight_conversion
    assert conv["within_bound"] and len(conv["per_layer"]) == 20 and conv["rel_fro_max"] < 1e-2


# --- calibration data and the command ------------------------------------------------------------------

def test_calibration_set_is_the_sampler_trajectory():
    model = init_random_(WanModel(CFG, AttentionConfig.for_model(CFG))).eval()
    ctx = [torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(5))]
    shape = (1, 16, 5, 8, 16)
    data = build_calibration_set(model, ctx, shape, steps=2, seeds=(3,))
    s0, s1 = data.samples
    assert (s0.step, s0.timestep, s1.step, s1.timestep) == (0, 988.0, 1, 932.0)
    t = rcm_times(2, CFG.sigma_max)
    g = torch.Generator().manual_seed(3)  # the sampler's draws: initial noise, then one per step
    noise0, noise1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert torch.allclose(s0.x, noise0 * t[0], atol=1e-6)
    # Step 1 sees the re-noised clean estimate of step 0, not fresh noise (float64 state, fp32 stored).
    x1 = sde_step(s0.x.double(), s0.velocity.double(), t[0], t[1], noise1.double()).float()
    assert torch.allclose(s1.x, x1, atol=1e-5)
    # ... which differs from t1 * noise by the clean estimate's share (1 - t1 = 6.6% of the mix).
    assert rel_error(s1.x, noise1 * t[1]) > 0.03
    # Each sample keeps the block maps its own forward made (the report compares against them).
    for s in data.samples:
        with block_selections(model, []) as maps, torch.no_grad():
            model.forward_from_sinusoid(*s.inputs(data, CFG.freq_dim, "cpu"))
        assert len(s.block_maps) == CFG.num_layers and s.block_maps[0].dtype == torch.int16
        assert all(torch.equal(a, b.long()) for a, b in zip(maps, s.block_maps))
    assert not torch.equal(data.samples[0].block_maps[0], data.samples[1].block_maps[0])


def test_cli_calibrates_from_an_embeddings_file(bundle, tmp_path):
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((2, 512, 64)).astype(np.float32))
    assert len(load_embeddings(emb, CFG)) == 2
    res = CliRunner().invoke(main, ["calibrate", str(bundle), "-o", str(tmp_path / "q"), "--mode", "int8",
                                    "--observer", "percentile", "--embeddings", str(emb), "--steps", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["observer"] == "percentile" and report["per_step"]
    cfg = load_cache(tmp_path / "q" / "calibration_cache.json").config
    assert cfg.prompts == () and len(cfg.embeddings_digest) == 64
    bad = CliRunner().invoke(main, ["calibrate", str(bundle), "-o", str(tmp_path / "q2"), "--mode", "fp8",
                                    "--observer", "entropy"])
    assert bad.exit_code != 0 and "for fp8 use max, percentile or mse" in bad.output
    np.save(tmp_path / "wrong.npy", np.zeros((1, 16, 64), np.float32))
    bad = CliRunner().invoke(main, ["calibrate", str(bundle), "-o", str(tmp_path / "q3"), "--embeddings",
                                    str(tmp_path / "wrong.npy")])
    assert bad.exit_code != 0 and "takes [N, 512, 64]" in bad.output


@pytest.mark.parametrize("zero", [0, 3])
def test_lint_reads_zero_points_stored_as_external_data(tmp_path, zero):
    """At 1.3B a per-channel zero point (1,536 bytes) goes to the data file; the lint reads it from the
    graph's folder, not from wherever the process runs."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 1536), np.int8), "w")
    s = numpy_helper.from_array(np.full(1536, 0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.full(1536, zero, np.int8), "zp")
    node = helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["y"], axis=1, name="dq")
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1536])],
                              initializer=[w, s, zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(tmp_path / "g.onnx"), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    found = [str(f) for f in lint(tmp_path / "g.onnx") if f.severity == "error"]
    if zero == 0:
        assert found == []
    else:
        assert len(found) == 1 and "zero point must be a constant 0" in found[0]
