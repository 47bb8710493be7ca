"""The SageSLA ONNX function body against the reference sparse core (`attention._sparse`).

The body is written node by node, so these tests are what ties it to the reference: ONNX Runtime
runs it at odd lengths, with and without the chunk `Loop`, and at the 480p / 81-frame length on a
small head layout. Tolerance: fp32 throughout; the body scales q by D^-0.5 before the product where
the reference scales the scores after, so results differ by a few ulp (measured <= 1e-6 of outputs
of magnitude ~1); 2e-6 absolute.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from turbotrt.core import sagesla as C
from turbotrt.core.configs import shape_profile
from turbotrt.export.sagesla_onnx import body_chunking, block_map_export, function_body
from turbotrt.models import attention as ref

TOL = 2e-6
_ELEM = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def one_node_model(q_shape, attrs, dtype=torch.float32, budget=None) -> tuple[onnx.ModelProto, onnx.FunctionProto]:
    fn = function_body(q_shape, dtype, attrs, 20, **({} if budget is None else {"budget": budget}))
    B, H, L, D = q_shape
    et = _ELEM[dtype]
    node = helper.make_node(C.OP_TYPE, list(C.INPUT_NAMES), ["o_s"], domain=C.DOMAIN, **attrs.to_onnx())
    inputs = [helper.make_tensor_value_info(n, et, q_shape) for n in "qkv"] + [
        helper.make_tensor_value_info("block_idx", TensorProto.INT32, [B, H, C.cdiv(L, attrs.block_q), attrs.kept_blocks]),
        helper.make_tensor_value_info("k_mean", TensorProto.FLOAT, [B, H, 1, D]),
        helper.make_tensor_value_info("v_amax", TensorProto.FLOAT, [B, H, 1, D])]
    graph = helper.make_graph([node], "sagesla", inputs, [helper.make_tensor_value_info("o_s", et, q_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(C.DOMAIN, 1)],
                              functions=[fn])
    onnx.checker.check_model(model, full_check=True)
    return model, fn


def run_body(q, k, v, bq, bk, topk, budget=None):
    attrs = C.SageSLAAttrs.for_shape(tuple(q.shape), bq, bk, topk, "none")
    idx = block_map_export(q, k, bq, bk, topk)
    model, fn = one_node_model(tuple(q.shape), attrs, q.dtype, budget)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zeros = np.zeros((q.shape[0], q.shape[1], 1, q.shape[3]), np.float32)
    got = session.run(None, dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), block_idx=idx.numpy(), k_mean=zeros, v_amax=zeros))[0]
    want = ref._sparse(q, k, v, idx.long(), bq, bk).to(q.dtype).numpy()
    return got, want, fn


def qkv(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


@pytest.mark.parametrize("budget", [None, 1], ids=["one-chunk", "loop"])
@pytest.mark.parametrize("B,H,L,D,bq,bk,topk", [
    (1, 2, 331, 64, 128, 64, 0.3),  # partial last query and key blocks
    (2, 3, 200, 128, 64, 128, 0.5),  # batch 2, the other kernel geometry
    (1, 2, 256, 64, 128, 64, 0.5),  # whole blocks: no key mask
    (1, 1, 97, 64, 64, 64, 1.0),  # every block kept, one partial block
    (1, 2, 1000, 64, 128, 64, 0.1),  # one kept block of 16
])
def test_body_equals_the_reference(B, H, L, D, bq, bk, topk, budget):
    got, want, fn = run_body(*qkv((B, H, L, D), L), bq, bk, topk, budget)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL * max(1.0, np.abs(want).max())
    assert any(n.op_type == "Loop" for n in fn.node) == (budget == 1 and C.cdiv(L, bq) > 1)


def test_fp16_body_casts_back_to_fp16():
    got, want, _ = run_body(*qkv((1, 2, 331, 64), 3, torch.float16), 128, 64, 0.3)
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= 2e-3  # one fp16 rounding of outputs ~3


def test_a_wrong_block_map_changes_the_output():
    """The body really reads block_idx (a test that cannot fail is a defect)."""
    q, k, v = qkv((1, 2, 331, 64), 5)
    attrs = C.SageSLAAttrs.for_shape(tuple(q.shape), 128, 64, 0.3, "none")
    model, _ = one_node_model(tuple(q.shape), attrs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    idx = block_map_export(q, k, 128, 64, 0.3).numpy()
    zeros = np.zeros((1, 2, 1, 64), np.float32)
    feeds = dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), k_mean=zeros, v_amax=zeros)
    a = session.run(None, dict(feeds, block_idx=idx))[0]
    b = session.run(None, dict(feeds, block_idx=(idx + 1) % C.cdiv(331, 64)))[0]
    assert np.abs(a - b).max() > 0.1


def _video_len(resolution: str) -> int:
    return shape_profile(resolution, 81).seq_len()


def test_480p_length_on_small_heads():
    """The real 480p / 81-frame length (32,760 tokens, 512 key blocks, 5% kept), one head of 64."""
    L = _video_len("480p")
    assert L == 32760
    q, k, v = qkv((1, 1, L, 64), 480)
    got, want, fn = run_body(q, k, v, 128, 64, 0.05, budget=1 << 22)  # several chunks of query blocks
    assert any(n.op_type == "Loop" for n in fn.node)
    assert np.abs(got - want).max() < TOL * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_body_size_does_not_grow_with_length(resolution):
    """1.3B's head layout at full length: a few dozen nodes, not one gather per chunk (a traced
    body had 8,067 nodes per layer at 480p), and memory per chunk under the budget."""
    L = _video_len(resolution)
    attrs = C.SageSLAAttrs.for_shape((1, 12, L, 128), 128, 64, 0.1, "int8_fp8")
    fn = function_body((1, 12, L, 128), torch.bfloat16, attrs, 20)
    (loop,) = [n for n in fn.node if n.op_type == "Loop"]
    body = helper.get_attribute_value(loop.attribute[0])
    assert len(fn.node) + len(body.node) < 60
    chunk, chunks = body_chunking((1, 12, L, 128), attrs)
    assert chunks > 1 and chunk * 12 * attrs.kept_blocks * 64 * 128 <= 1 << 26


def test_the_body_builds_in_tensorrt_for_rtx(tmp_path):
    """TensorRT for RTX inlines the body, Loop included (parse and build only: running needs a GPU)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (the [rtx] extra)")
    from turbotrt.build.rtx import build_plan_bytes

    for budget in (None, 1):
        attrs = C.SageSLAAttrs.for_shape((1, 2, 331, 64), 128, 64, 0.3, "none")
        model, _ = one_node_model((1, 2, 331, 64), attrs, budget=budget)
        path = tmp_path / f"sagesla-{budget}.onnx"
        onnx.save(model, str(path))
        assert len(build_plan_bytes(path, ["sm_89"], log=lambda *_: None)) > 0
