import json
import shutil
import subprocess
import sys

import onnx
import pytest
import torch

from turbotrt.core import sagesla as contract
from turbotrt.core.configs import AttentionConfig, default_profile, get_config
from turbotrt.export import dit
from turbotrt.export.api import ExportError, export
from turbotrt.export.lint import lint_model
from turbotrt.export.networks import export_graph
from turbotrt.export.sagesla_onnx import block_map_export
from turbotrt.models.attention import block_map

quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def bundles(tiny_bundle):
    """One export per attention mode of the tiny model (fp32), validated in ONNX Runtime."""
    return {mode: tiny_bundle.result(mode) for mode in ("dense", "sla", "sagesla")}


@pytest.mark.parametrize("mode", ["dense", "sla", "sagesla"])
def test_tiny_dit_matches_pytorch_in_onnxruntime(bundles, mode):
    result = bundles[mode]
    (report,) = [r for r in result.reports if r.network == "dit"]
    # fp32 tolerance (DIT_TOLERANCE): same math, different kernels; measured ~2e-6 of a max of ~4.
    assert report.passed, report.format()
    assert report.outputs[0].max_abs < 1e-4 and report.outputs[0].cosine > 0.99999


def test_custom_node_attributes_and_function_body(bundles):
    path = bundles["sagesla"].out / "dit.onnx"
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == contract.DOMAIN]
    cfg = get_config("wan-tiny")
    assert len(nodes) == cfg.num_layers
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"turbodiffusion" and attrs["plugin_version"] == b"1"
    assert attrs["block_q"] == 128 and attrs["block_k"] == 64 and attrs["kept_blocks"] == 1
    assert attrs["quant"] == b"int8_fp8" and abs(attrs["sm_scale"] - 128**-0.5) < 1e-7
    assert list(nodes[0].input)[:3] and len(nodes[0].input) == len(contract.INPUT_NAMES)
    assert nodes[0].name.startswith("blocks.0.self_attn.attn_op.local_attn/")
    (fn,) = [f for f in model.functions if f.domain == contract.DOMAIN and f.name == contract.OP_TYPE]
    assert list(fn.input) == list(contract.INPUT_NAMES) and list(fn.output) == list(contract.OUTPUT_NAMES)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert lint_model(model) == []


def test_weights_are_external_and_named_like_the_checkpoint(bundles):
    path = bundles["sla"].out / "dit.onnx"
    model = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == set(dit.random_weights(get_config("wan-tiny")))
    names = [n.name for n in model.graph.node]
    assert any(n.startswith("blocks.1.self_attn.q/") for n in names)
    assert any(n.startswith("blocks.0.ffn.0/") for n in names)


def test_manifest_records_what_was_exported(bundles):
    m = json.loads((bundles["sagesla"].out / "manifest.json").read_text())
    assert m["attention"] == {"mode": "sagesla", "block_q": 128, "block_k": 64, "topk": 0.5, "v_dtype": "fp8"}
    assert m["graphs"]["dit"]["spec"]["inputs"][0]["name"] == "x"
    assert m["sampler"]["net_timesteps"]["4"] == [988.0, 932.0, 852.0, 608.0]
    assert all(r["passed"] for r in m["validation"])


@pytest.mark.parametrize("L,bq,bk,topk", [(160, 64, 64, 0.5), (331, 128, 64, 0.3), (200, 64, 128, 0.5), (97, 64, 64, 1.0)])
def test_export_block_map_equals_reference(L, bq, bk, topk):
    g = torch.Generator().manual_seed(L)
    q, k = torch.randn(1, 2, L, 64, generator=g), torch.randn(1, 2, L, 64, generator=g)
    got = block_map_export(q, k, bq, bk, topk)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), block_map(q, k, bq, bk, topk))


def test_fp16_export_matches_fp16_reference(tmp_path):
    result = export("wan-tiny", tmp_path / "fp16", precision="fp16", attention="sla", **quiet)
    (report,) = [r for r in result.reports if r.network == "dit"]
    assert report.passed, report.format()  # fp16 tolerance: rounding in a different order


def test_bf16_export_is_checked_but_not_run_on_cpu(tmp_path):
    result = export("wan-tiny", tmp_path / "bf16", precision="bf16", attention="sagesla", **quiet)
    (report,) = [r for r in result.reports if r.network == "dit"]
    assert report.skipped and "bf16" in report.skipped
    onnx.checker.check_model(onnx.load(str(result.out / "dit.onnx")), full_check=True)


def test_export_from_checkpoints_float_and_quant(tmp_path):
    from turbotrt.models.checkpoint import save_state_dict
    from turbotrt.models.wan import random_wan_state_dict

    cfg = get_config("wan-tiny")
    ckpt = save_state_dict(random_wan_state_dict(cfg, seed=5, dtype="bf16"), tmp_path / "ckpt.safetensors")
    result = export(str(ckpt), tmp_path / "out", precision="fp32", attention="sla", **quiet)
    assert all(r.passed for r in result.reports), [r.format() for r in result.reports]
    assert set(result.graphs) == {"dit"}  # no --text-encoder/--vae/--tokenizer: only the DiT
    # A -quant checkpoint as a float bundle would silently dequantize its int8 weights: refused.
    quant = save_state_dict(random_wan_state_dict(cfg, seed=5, dtype="bf16", quantized=True),
                            tmp_path / "quant.safetensors")
    with pytest.raises(ExportError, match="W8A8 -quant checkpoint.*--precision int8"):
        export(str(quant), tmp_path / "outq", precision="fp32", attention="sla", **quiet)
    assert not (tmp_path / "outq").exists()


def test_polygraphy_inspects_and_runs_the_graph(bundles, tmp_path):
    exe = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).with_name("polygraphy"))
    path = str(bundles["sagesla"].out / "dit.onnx")
    r = subprocess.run([exe, "inspect", "model", path, "--show", "layers"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SageSLA" in r.stdout
    r = subprocess.run([exe, "run", path, "--onnxrt", "--save-outputs", str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "PASSED" in r.stdout + r.stderr


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path):
    cfg = get_config("wan-tiny")
    weights = dit.random_weights(cfg)
    calls = []

    def flaky(name):
        calls.append(name)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return weights[name]

    (net,) = dit.definitions(cfg, default_profile(cfg), AttentionConfig.for_model(cfg), "fp32", {"dit": flaky})
    with pytest.raises(KeyboardInterrupt):
        export_graph(net, tmp_path / "dit.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bundle_folder_appears_only_when_complete(tmp_path, monkeypatch):
    import turbotrt.export.api as api

    def boom(*a, **k):
        raise RuntimeError("validation exploded")

    monkeypatch.setattr(api, "validate_onnx", boom)
    with pytest.raises(RuntimeError):
        export("wan-tiny", tmp_path / "b", precision="fp32", **quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(source="wan-tiny", resolution="720p"), "supports resolutions tiny"),
    (dict(source="wan-tiny", frames=80), "4k\\+1"),
    (dict(source="wan-big"), "neither a preset"),
    (dict(source="wan2.1-t2v-14b"), "full-size preset: give its checkpoint"),
    (dict(source="wan-tiny", precision="int4"), "unknown precision"),
    (dict(source="wan-tiny", attention="flash"), "unknown attention"),
])
def test_bad_requests_are_clear_errors(tmp_path, kwargs, match):
    with pytest.raises((ExportError, ValueError), match=match):
        export(out=tmp_path / "x", **kwargs, **quiet)
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_force(bundles):
    from turbotrt.core.errors import TurbotrtError

    with pytest.raises(TurbotrtError, match="--force"):
        export("wan-tiny", bundles["dense"].out, **quiet)


def test_lint_flags_what_tensorrt_refuses():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="bad_topk", sorted=0),
        helper.make_node("Cast", ["v"], ["d"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node(contract.OP_TYPE, ["x"], ["s"], name="no_ns", domain=contract.DOMAIN),
        helper.make_node("Unique", ["x"], ["f"], name="unique"),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("d", "i", "s", "f")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, [k]),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(contract.DOMAIN, 1)])
    found = {(f.node, f.severity) for f in lint_model(model)}
    assert ("bad_topk", "error") in found
    assert ("to_double", "warning") in found
    assert ("no_ns", "error") in found
    assert ("unique", "error") in found


def test_cli_export(tmp_path):
    from click.testing import CliRunner

    from turbotrt.cli import main

    r = CliRunner().invoke(main, ["export", "wan-tiny", "--out", str(tmp_path / "b"), "--precision", "fp32",
                                  "--attention", "dense"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and (tmp_path / "b" / "dit.onnx").exists()
    r = CliRunner().invoke(main, ["export", "wan-tiny", "--out", str(tmp_path / "c"), "--frames", "8"])
    assert r.exit_code == 1 and "4k+1" in r.output
