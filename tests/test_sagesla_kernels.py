"""SageSLA Triton kernels (run in Triton's CPU interpreter) and the `turbotrt::sagesla` custom op.

Triton fixes interpreter-or-compiler when it is imported (TRITON_INTERPRET), and the rest of the suite
needs the compiler (AOT PTX). So the kernel tests run in a child pytest with TRITON_INTERPRET=1, once
per session of this module; in this process each kernel test reports the child's outcome for its
own id. Set TRITON_INTERPRET=1 yourself to run them directly.
"""

import functools
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from turbotrt.models import attention as ref

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]
GEOMETRIES = [(128, 64), (64, 128)]  # (block_q, block_k): sagesla off sm90 / on sm90
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
V_DTYPE = {"int8_fp8": "fp8", "int8_fp16": "fp16"}
_state = {}


# --- running the kernel tests in the interpreter ------------------------------------------------------

@pytest.fixture(scope="module")
def interpreter_results(request, tmp_path_factory):
    """Run this session's selected kernel tests under TRITON_INTERPRET=1 in a child pytest:
    {test name: (outcome, message)}, plus the tail of the child's log."""
    pytest.importorskip("triton", reason="the SageSLA kernels need triton")
    selected = [item.nodeid for item in request.session.items
                if item.module is sys.modules[__name__] and getattr(item.function, "in_interpreter", False)]
    report = tmp_path_factory.mktemp("interpreter") / "junit.xml"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pytest", *selected, "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           f"--rootdir={request.config.rootpath}"]
    proc = subprocess.run(cmd, cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    message = f"{node.get('message', '')}\n{node.text or ''}"
                    break
            results[case.get("name")] = (outcome, message)
    return results, (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(autouse=True)
def _current_test(request):
    _state["name"] = request.node.name
    _state["request"] = request


def in_interpreter(test):
    """Run `test` in the interpreter child; in this process, pass, skip or fail as the child did."""
    if INTERPRETER:
        return test

    @functools.wraps(test)
    def delegate(*args, **kwargs):
        results, log = _state["request"].getfixturevalue("interpreter_results")
        outcome, message = results.get(_state["name"], ("failed", f"no result in the interpreter run:\n{log}"))
        if outcome == "skipped":
            pytest.skip(message)
        if outcome == "failed":
            pytest.fail(f"failed under TRITON_INTERPRET=1:\n{message}", pytrace=False)

    delegate.in_interpreter = True
    return delegate


def _kernels():
    from turbotrt.plugins.sagesla import kernels

    assert kernels.interpreted(), "kernel tests must run with TRITON_INTERPRET=1 set before triton is imported"
    return kernels


# --- inputs -------------------------------------------------------------------------------------------

def _qkv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    k = k + 0.75 * torch.randn(shape[-1], generator=g)  # a shared offset: what K smoothing removes
    v = v * torch.rand(shape[-1], generator=g) * 3  # channels of different ranges: per-channel V scales
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _block_idx(B, H, L, block_q, block_k, n, seed=0):
    """Random sorted kept blocks [B, H, Nq, n] int32; every row of head 0 keeps the partial last block."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(L / block_q), math.ceil(L / block_k)
    idx = torch.stack([torch.randperm(nk, generator=g)[:n] for _ in range(B * H * nq)]).reshape(B, H, nq, n)
    last = (idx[:, :1] == nk - 1).any(-1, keepdim=True)
    idx[:, :1] = torch.where(last, idx[:, :1], torch.cat([idx[:, :1, :, :-1], torch.full_like(idx[:, :1, :, :1], nk - 1)], -1))
    return idx.sort(dim=-1).values.to(torch.int32)


def _stats(k, v):
    return k.float().mean(dim=-2, keepdim=True), v.float().abs().amax(dim=-2, keepdim=True)


# --- quantization kernels: bit-exact with the PyTorch emulation ---------------------------------------

@in_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block,smooth", [(128, False), (64, False), (64, True), (128, True)])
@pytest.mark.parametrize("L,D", [(77, 64), (333, 128)])
def test_quantize_per_block_int8_bit_exact(dtype, block, smooth, L, D):
    K = _kernels()
    x = _qkv((1, 2, L, D), dtype)[1]
    x[0, 1, :block] = 0  # an all-zero block: its scale is the 1e-7 epsilon
    x8, scale = K.quantize_per_block_int8(x, block, mean=x.float().mean(dim=-2, keepdim=True) if smooth else None)
    r8, rscale = ref.quantize_per_block_int8(x, block, smooth=smooth)
    assert x8.dtype == torch.int8 and scale.shape == rscale.shape
    assert torch.equal(scale, rscale)
    assert torch.equal(x8, r8), f"{(x8 != r8).sum().item()} int8 values differ"


@in_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v_dtype", ["fp8", "fp16"])
@pytest.mark.parametrize("L,D", [(77, 64), (333, 128)])
def test_quantize_v_bit_exact(dtype, v_dtype, L, D):
    K = _kernels()
    v = _qkv((1, 2, L, D), dtype)[2]
    v[:, :, :, 3] = 0  # a zero channel: quantizes to zeros with scale 0
    vq, scale = K.quantize_v_per_channel(v, v.float().abs().amax(dim=-2, keepdim=True), v_dtype)
    rq, rscale = ref.quantize_v_per_channel(v, v_dtype)
    assert vq.dtype == rq.dtype and torch.equal(scale, rscale)
    assert torch.equal(vq.view(torch.uint8 if v_dtype == "fp8" else torch.int16),
                       rq.view(torch.uint8 if v_dtype == "fp8" else torch.int16))


# --- attention kernels vs the reference math ----------------------------------------------------------

# Tolerances, compared in fp32 (the worst case measured over these tests in brackets):
# - Low-bit modes: the kernels reproduce the emulation's quantization bit for bit (tested above), so
#   what is left is summation order in the dots and row sums [fp32 out: 5e-7]. int8_fp16 also rounds
#   each block's P.V partial to fp16 (as sm80 does); summation-order noise can flip that rounding by one
#   fp16 ulp of the partial (2^-6 for partials of 32..64), divided by the row sum [3e-4]: atol 1e-3.
# - none: fp32 against fp32 math [2e-6]; fp16 rounds P to fp16 before P.V, one fp16 ulp [9.8e-4]:
#   atol 2e-3; bf16 runs upcast in the interpreter, so only the output's rounding differs.
# - fp16/bf16 outputs may land one ulp of the output dtype apart: rtol of one ulp.
_ULP = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
_ATOL = {("none", torch.float16): 2e-3, "int8_fp16": 1e-3}


def _tol(quant, dtype):
    return dict(rtol=_ULP[dtype], atol=_ATOL.get((quant, dtype), _ATOL.get(quant, 1e-5)))


def _reference(q, k, v, idx, bq, bk, quant):
    if quant == "none":
        return ref.sparse_attention(q, k, v, idx, bq, bk)
    return ref.sagesla_sparse_attention(q, k, v, idx, bq, bk, V_DTYPE[quant])


@in_interpreter
@pytest.mark.parametrize("quant", ["none", "int8_fp8", "int8_fp16"])
@pytest.mark.parametrize("D,dtype", [(128, t) for t in DTYPES] + [(64, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}")
def test_attention_matches_reference(geometry, D, dtype, quant):
    """L = 200: partial last query block (72 or 8 rows) and partial last key block (8 or 72 keys)."""
    K = _kernels()
    bq, bk = geometry
    B, H, L = 1, 2, 200
    q, k, v = _qkv((B, H, L, D), dtype, seed=D)
    idx = _block_idx(B, H, L, bq, bk, n=2, seed=D)
    k_mean, v_amax = _stats(k, v)
    want = _reference(q, k, v, idx, bq, bk, quant).float()
    got = K.sagesla_forward(q, k, v, idx, k_mean, v_amax, bq, bk, D**-0.5, quant, fused=True)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, **_tol(quant, dtype))
    if quant != "none":
        # Quantizing each K/V block inside the attention kernel is the same math as doing it up front.
        prequant = K.sagesla_forward(q, k, v, idx, k_mean, v_amax, bq, bk, D**-0.5, quant, fused=False)
        assert torch.equal(got, prequant)


@in_interpreter
@pytest.mark.parametrize("quant", ["none", "int8_fp8", "int8_fp16"])
def test_attention_shorter_than_one_block(quant):
    """L = 50 < every block: one partial query block attending to one partial key block."""
    K = _kernels()
    q, k, v = _qkv((2, 1, 50, 64), torch.float16, seed=3)
    idx = torch.zeros(2, 1, 1, 1, dtype=torch.int32)
    want = _reference(q, k, v, idx, 128, 64, quant).float()
    for fused in (False, True):
        got = K.sagesla_forward(q, k, v, idx, *_stats(k, v), 128, 64, 64**-0.5, quant, fused=fused)
        torch.testing.assert_close(got.float(), want, **_tol(quant, torch.float16))


@in_interpreter
def test_all_blocks_kept_is_dense_attention():
    K = _kernels()
    q, k, v = _qkv((1, 2, 200, 64), torch.float32, seed=5)
    idx = torch.arange(4, dtype=torch.int32).expand(1, 2, 2, 4).contiguous()  # 128/64 blocks: 2 x 4
    got = K.sagesla_forward(q, k, v, idx, *_stats(k, v), 128, 64, 64**-0.5, "none")
    torch.testing.assert_close(got, ref.dense_attention(q, k, v), rtol=1e-5, atol=1e-5)


@in_interpreter
def test_low_bit_kernels_use_the_contract_statistics():
    """k_mean and v_amax are inputs, not recomputed: a different V amax changes the FP8 grid of V."""
    K = _kernels()
    q, k, v = _qkv((1, 1, 130, 64), torch.float32, seed=7)
    idx = torch.tensor([[0, 2], [1, 2]], dtype=torch.int32).reshape(1, 1, 2, 2)  # 128/64 blocks of L=130
    k_mean, v_amax = _stats(k, v)
    base = K.sagesla_forward(q, k, v, idx, k_mean, v_amax, 128, 64, 0.125, "int8_fp8", fused=True)
    other = K.sagesla_forward(q, k, v, idx, k_mean, v_amax * 3, 128, 64, 0.125, "int8_fp8", fused=True)
    assert not torch.equal(base, other)
    torch.testing.assert_close(other, base, rtol=0.1, atol=0.1)  # still V, on a coarser grid

