"""umT5 and VAE export: tiny presets traced on `meta`, weights streamed, checked in ONNX Runtime (CPU).

Tolerances: fp32 graphs against PyTorch use text_encoder.TOLERANCE / vae.TOLERANCE["fp32"] (atol 1e-4 + rtol 1e-4
* max|ref|, cosine >= 0.99999; measured ~1e-6 to 1e-5); the fp16 VAE step uses VAE_TOLERANCE["fp16"]
(atol 2e-2 + rtol 1e-2 * max|ref|, cosine >= 0.9999; measured ~8e-3 worst). Streamed ORT loops match
the PyTorch streamed decode/encode to atol 1e-4. Padding rows are compared with == 0, and a graph
exported from a checkpoint file with the same graph exported from the same weights in memory, exactly.
Every graph goes through the same `export_graph` as a bundle export, from the networks' definitions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from turbotrt.core.configs import ShapeProfile
from turbotrt.export import text_encoder, vae
from turbotrt.export.lint import lint_model
from turbotrt.export.networks import export_graph, random_feeds
from turbotrt.export.validate import run_onnxruntime, validate_onnx
from turbotrt.models.checkpoint import CheckpointError, save_state_dict
from turbotrt.models.t5 import random_t5_state_dict
from turbotrt.models.vae import build_vae, decode_cache_spec, encode_cache_spec, random_vae_state_dict

T5 = "umt5-tiny"
VAE = "wan-vae-tiny"
HEIGHT, WIDTH = 16, 32  # latent 2 x 4
PROFILE = ShapeProfile("test", "2:1", width=WIDTH, height=HEIGHT, frames=9)
PROMPT_LENS = (5, 300)
T5_INLINE = 8 * 512**2 + 64 * 1024  # the folded int64 [text_len, text_len] relative-position bucket table
VAE_NETWORKS = vae.VAE_NETWORKS
t5_spec, t5_feeds, t5_reference = text_encoder.spec, text_encoder.feeds, text_encoder.reference
t5_checkpoint_weights, T5_TOLERANCE = text_encoder.checkpoint_weights, text_encoder.TOLERANCE
vae_spec, vae_specs, vae_reference = vae.spec, vae.specs, vae.reference
vae_checkpoint_weights, VAE_TOLERANCE = vae.checkpoint_weights, vae.TOLERANCE


def export_text_encoder(config, spec, path, weights):
    net = text_encoder.definition(config, spec.precision, weights, batch=spec.inputs[0].shape[0])
    return export_graph(net, path)


def export_vae_graph(config, spec, path, weights):
    (net,) = vae.definitions(config, PROFILE, spec.precision, weights, [spec.network])
    return export_graph(net, path)


def export_vae(config, profile, precision, out_dir, weights, networks=VAE_NETWORKS):
    return {net.network: export_graph(net, out_dir / f"{net.network}.onnx")
            for net in vae.definitions(config, profile, precision, weights, networks)}


def load(path, data=False) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=data)


def io_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {v.name: (v.type.tensor_type.elem_type, tuple(d.dim_value for d in v.type.tensor_type.shape.dim))
            for v in (*model.graph.input, *model.graph.output)}


def check_layout(path, spec, checkpoint_keys, max_inline: int = 64 * 1024) -> None:
    """Declared I/O equals the spec; weights are external and named like the checkpoint; the graph is
    valid ONNX, readable by TensorRT's rules, and its nodes are named by module path."""
    model = load(path)
    np_to_onnx = {"int32": onnx.TensorProto.INT32, "float32": onnx.TensorProto.FLOAT,
                  "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    assert io_types(model) == {s.name: (np_to_onnx[s.dtype], s.shape) for s in (*spec.inputs, *spec.outputs)}
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and {t.name for t in external} <= set(checkpoint_keys)
    assert all(e.value == path.name + ".data" for t in external for e in t.external_data if e.key == "location")
    assert {t.name for t in inline}.isdisjoint(checkpoint_keys)
    assert sum(len(t.raw_data) for t in inline) < max_inline  # folded constants only, no weight data
    assert [f for f in lint_model(model) if f.severity == "error"] == []
    onnx.checker.check_model(load(path, data=True), full_check=True)


# ---------------------------------------------------------------------------------------------
# umT5


@pytest.fixture(scope="module")
def t5_weights():
    return random_t5_state_dict(T5, seed=2)


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory, t5_weights):
    spec = t5_spec(T5, "fp32", batch=len(PROMPT_LENS))
    path = export_text_encoder(T5, spec, tmp_path_factory.mktemp("t5") / "text_encoder.onnx", t5_weights)
    return spec, path


def test_t5_matches_pytorch_in_onnxruntime(t5_export, t5_weights):
    spec, path = t5_export
    report = validate_onnx(path, spec, t5_reference(T5, t5_weights, "fp32"), t5_feeds(spec, PROMPT_LENS))
    assert report.passed, report.format()
    assert spec.tolerance == T5_TOLERANCE["fp32"] and report.outputs[0].max_abs < 1e-4


def test_t5_padding_is_exactly_zero_in_onnxruntime(t5_export):
    spec, path = t5_export
    context = run_onnxruntime(path, t5_feeds(spec, PROMPT_LENS, seed=1))["context"]
    assert context.shape == (2, 512, 64) and context.dtype == np.float32
    for row, n in zip(context, PROMPT_LENS):
        assert np.all(row[n:] == 0)
        assert np.all(np.abs(row[:n]).max(axis=-1) > 0)


def test_t5_graph_layout(t5_export, t5_weights):
    spec, path = t5_export
    check_layout(path, spec, t5_weights, T5_INLINE)
    model = load(path)
    # A tiny encoder uses every weight, so the external set is exactly the checkpoint's keys.
    assert {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == set(t5_weights)
    names = [n.name for n in model.graph.node]
    assert any(n.startswith("blocks.1.attn.q/") for n in names)
    assert any(n.startswith("blocks.0.ffn.gate.0/") for n in names)


def test_t5_bf16_is_bf16_inside_and_fp32_at_the_boundary(tmp_path, t5_weights):
    spec = t5_spec(T5, "bf16")
    path = export_text_encoder(T5, spec, tmp_path / "text_encoder.onnx", t5_weights)
    check_layout(path, spec, t5_weights, T5_INLINE)
    model = load(path)
    assert {t.data_type for t in model.graph.initializer if t.name in t5_weights} == {onnx.TensorProto.BFLOAT16}
    report = validate_onnx(path, spec, t5_reference(T5, t5_weights, "bf16"))
    assert report.skipped and "bf16" in report.skipped


def test_t5_refuses_fp16_with_the_reason():
    with pytest.raises(ValueError, match="overflow fp16.*bf16"):
        t5_spec(T5, "fp16")
    fp16 = dataclasses.replace(t5_spec(T5, "fp32"), precision="fp16")
    with pytest.raises(ValueError, match="overflow fp16"):
        export_text_encoder(T5, fp16, "unused.onnx", {})
    with pytest.raises(ValueError, match="exports in fp32 or bf16, not 'int4'"):
        t5_spec(T5, "int4")


def test_interrupted_t5_export_leaves_no_final_file(tmp_path, t5_weights):
    calls = []

    def flaky(name):
        calls.append(name)
        if len(calls) > len(t5_weights) // 2:
            raise RuntimeError("disk went away")
        return t5_weights[name]

    with pytest.raises(RuntimeError, match="disk went away"):
        export_text_encoder(T5, t5_spec(T5, "fp32"), tmp_path / "text_encoder.onnx", flaky)
    assert len(calls) > 1 and list(tmp_path.iterdir()) == []


def test_t5_from_checkpoint_equals_in_memory_export(tmp_path, t5_export, t5_weights):
    spec, path = t5_export
    ckpt = save_state_dict(t5_weights, tmp_path / "umt5.pth")
    from_file = export_text_encoder(T5, spec, tmp_path / "text_encoder.onnx", t5_checkpoint_weights(ckpt, T5))
    feeds = t5_feeds(spec, PROMPT_LENS)
    np.testing.assert_array_equal(run_onnxruntime(from_file, feeds)["context"], run_onnxruntime(path, feeds)["context"])


def test_t5_checkpoint_missing_key_is_named(tmp_path, t5_weights):
    sd = {k: v for k, v in t5_weights.items() if k != "blocks.1.attn.k.weight"}
    ckpt = save_state_dict(sd, tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.attn\.k\.weight"):
        t5_checkpoint_weights(ckpt, T5)
    with pytest.raises(CheckpointError, match="not found"):
        t5_checkpoint_weights(tmp_path / "nope.pth", T5)


# ---------------------------------------------------------------------------------------------
# VAE


@pytest.fixture(scope="module")
def vae_weights():
    return random_vae_state_dict(VAE, seed=1)


@pytest.fixture(scope="module")
def vae_model(vae_weights):
    model = build_vae(VAE, "cpu")
    model.load_state_dict(vae_weights)
    return model


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory, vae_weights):
    out = tmp_path_factory.mktemp("vae")
    return vae_specs(VAE, PROFILE, "fp32"), export_vae(VAE, PROFILE, "fp32", out, vae_weights)


@pytest.mark.parametrize("network", VAE_NETWORKS)
def test_vae_graph_matches_pytorch_in_onnxruntime(vae_export, vae_weights, network):
    specs, paths = vae_export
    spec = specs[network]
    report = validate_onnx(paths[network], spec, vae_reference(VAE, spec, vae_weights), random_feeds(spec, seed=3))
    assert report.passed, report.format()
    assert spec.tolerance == VAE_TOLERANCE["fp32"] and max(o.max_abs for o in report.outputs) < 1e-4


def test_vae_graph_io_and_layout(vae_export, vae_weights):
    specs, paths = vae_export
    assert sorted(paths) == sorted(VAE_NETWORKS)
    decode_cache, encode_cache = decode_cache_spec(VAE, 2, 4), encode_cache_spec(VAE, HEIGHT, WIDTH)
    for network, spec in specs.items():
        cache = decode_cache if "decode" in network else encode_cache
        first = network.endswith("first")
        x, y = ("z", "video") if "decode" in network else ("video", "z")
        ins = [x] + ([] if first else [f"cache_in.{i}" for i in range(len(cache))])
        assert spec.input_names == ins and spec.output_names == [y] + [f"cache_out.{i}" for i in range(len(cache))]
        assert spec.extra["cache_layers"] == [name for name, _ in cache]
        assert [o.shape for o in spec.outputs[1:]] == [shape for _, shape in cache]
        assert spec.inputs[0].dtype == spec.outputs[0].dtype == "float32"
        frames = 1 if first else 4
        video = (1, 3, frames, HEIGHT, WIDTH)
        assert (spec.inputs[0] if "encode" in network else spec.outputs[0]).shape == video
        check_layout(paths[network], spec, vae_weights)
        model = load(paths[network])
        part = "decoder." if "decode" in network else "encoder."
        assert all(t.name.startswith((part, "conv2." if "decode" in network else "conv1."))
                   for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        assert any(n.name.startswith(f"{part}middle.1/") for n in model.graph.node)  # the attention block
        assert {"latent_mean", "latent_std"} <= {t.name for t in model.graph.initializer}


def test_vae_decode_loop_in_onnxruntime_equals_streamed_pytorch(vae_export, vae_model):
    _, paths = vae_export
    z = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(7))
    out = run_onnxruntime(paths["vae_decode_first"], {"z": z[:, :, :1].numpy()})
    frames = [out.pop("video")]
    for t in (1, 2):
        feeds = {"z": z[:, :, t : t + 1].numpy(), **{k.replace("cache_out", "cache_in"): v for k, v in out.items()}}
        out = run_onnxruntime(paths["vae_decode_step"], feeds)
        frames.append(out.pop("video"))
    with torch.no_grad():
        want = vae_model.decode(z).numpy()
    got = np.concatenate(frames, axis=2)
    assert got.shape == want.shape == (1, 3, 9, HEIGHT, WIDTH)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_vae_encode_loop_in_onnxruntime_equals_streamed_pytorch(vae_export, vae_model):
    _, paths = vae_export
    x = torch.rand(1, 3, 9, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(8)) * 2 - 1
    out = run_onnxruntime(paths["vae_encode_first"], {"video": x[:, :, :1].numpy()})
    latents = [out.pop("z")]
    for s in (1, 5):
        feeds = {"video": x[:, :, s : s + 4].numpy(), **{k.replace("cache_out", "cache_in"): v for k, v in out.items()}}
        out = run_onnxruntime(paths["vae_encode_step"], feeds)
        latents.append(out.pop("z"))
    with torch.no_grad():
        want = vae_model.encode(x).numpy()
    got = np.concatenate(latents, axis=2)
    assert got.shape == want.shape == (1, 16, 3, 2, 4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_vae_fp16_step_keeps_the_cache_in_fp16(tmp_path, vae_weights):
    spec = vae_spec(VAE, "vae_decode_step", HEIGHT, WIDTH, "fp16")
    path = export_vae_graph(VAE, spec, tmp_path / "vae_decode_step.onnx", vae_weights)
    check_layout(path, spec, vae_weights)
    assert {s.dtype for s in (*spec.inputs[1:], *spec.outputs[1:])} == {"float16"}
    # A real cache (from the fp16 PyTorch first step), not noise, so the step sees realistic values.
    model = build_vae(VAE, "cpu")
    model.load_state_dict(vae_weights)
    z = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, cache = model.half().decode_first(z[:, :, :1].half())
    feeds = {"z": z[:, :, 1:].numpy(), **{f"cache_in.{i}": c.numpy() for i, c in enumerate(cache)}}
    report = validate_onnx(path, spec, vae_reference(VAE, spec, vae_weights), feeds)
    assert report.passed, report.format()


def test_vae_checkpoint_getter_checks_every_key(tmp_path, vae_weights):
    ckpt = save_state_dict(vae_weights, tmp_path / "vae.pth")
    get = vae_checkpoint_weights(ckpt, VAE)
    assert torch.equal(get("decoder.conv1.weight"), vae_weights["decoder.conv1.weight"])
    sd = {k: v for k, v in vae_weights.items() if k != "decoder.head.2.bias"}
    with pytest.raises(CheckpointError, match=r"missing: decoder\.head\.2\.bias"):
        vae_checkpoint_weights(save_state_dict(sd, tmp_path / "broken.safetensors"), VAE)
    with pytest.raises(CheckpointError, match="wan-vae-tiny"):
        vae_checkpoint_weights(ckpt, "wan2.1-vae")


@pytest.mark.parametrize("args,match", [
    (("vae_decode_middle", 16, 32, "fp32"), "unknown VAE network"),
    (("vae_decode_step", 20, 32, "fp32"), "multiples of 8"),
    (("vae_encode_step", 16, 32, "int8"), "exports in fp32, fp16, bf16, not 'int8'"),
])
def test_bad_vae_requests_are_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        vae_spec(VAE, *args)
