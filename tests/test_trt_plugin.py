"""The TensorRT plugin definitions (`turbotrt.plugins.trt`).

TensorRT cannot be installed on CI machines, so most tests drive the definitions through a stand-in
`tensorrt.plugin` that enforces the schema rules TensorRT's documentation states for register, impl,
aot_impl and autotune functions. Tests marked `tensorrt` need the real package and skip without it.
"""

import inspect
import math
import subprocess
import sys
import types
import typing

import pytest
import torch

from turbotrt.plugins import trt as plugins
from turbotrt.core import sagesla as C

ATTRS = {"block_q": int, "block_k": int, "kept_blocks": int, "sm_scale": float, "quant": str}
INPUTS = list(C.INPUT_NAMES)


# --- a stand-in for tensorrt / tensorrt.plugin ---------------------------------------------------------

class _Expr(int):
    """A static shape expression."""
    is_constant = True

    @property
    def constant_value(self):
        return int(self)


def _fake_tensorrt(version="10.9.0", aot=True):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    for name in ("float16", "bfloat16", "float32", "int32"):
        setattr(trt, name, f"DataType.{name}")
    trtp = types.ModuleType("tensorrt.plugin")
    trt.plugin = trtp
    trtp.op = types.SimpleNamespace()
    trtp.defs = {}

    class TensorDesc:
        def __init__(self, shape=(), dtype=None):
            self.shape_expr, self.dtype = tuple(_Expr(d) for d in shape), dtype

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
        shared_mem = 0

    class SymInt32:
        def __init__(self, value):
            self.value = int(value)

    class SymIntExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    class AutoTuneCombination:
        def __init__(self, io_types, layouts="LINEAR", tactics=None):
            self.io_types, self.layouts, self.tactics = io_types, layouts, tactics

    trtp.TensorDesc, trtp.Tensor, trtp.KernelLaunchParams = TensorDesc, type("Tensor", (), {}), KernelLaunchParams
    trtp.SymInt32, trtp.SymExprs, trtp.SymIntExprs = SymInt32, list, SymIntExprs
    trtp.AutoTuneCombination = AutoTuneCombination
    trtp.cdiv = lambda a, b: -(-int(a) // int(b))

    def _params(fn):
        params = inspect.signature(fn).parameters.values()
        for p in params:  # TensorRT evaluates annotations and rejects defaults
            assert not isinstance(p.annotation, str), f"{fn.__name__}: annotation of {p.name} is a string"
            assert p.default is inspect.Parameter.empty, f"{fn.__name__}: {p.name} has a default"
        return [p.name for p in params]

    def _attr_subset(fn, names, tail):
        attrs = names[len(INPUTS):len(names) - len(tail)]
        assert names[:len(INPUTS)] == INPUTS and names[len(names) - len(tail):] == tail, names
        assert attrs == [a for a in trtp.defs["attrs"] if a in attrs], "attributes out of registration order"
        for a in attrs:
            ann = inspect.signature(fn).parameters[a].annotation
            assert ann in (inspect.Parameter.empty, trtp.defs["attrs"][a]), f"{a}: {ann}"

    def register(plugin_id):
        def deco(fn):
            ns, name = plugin_id.split("::")
            space = getattr(trtp.op, ns, None) or types.SimpleNamespace()
            setattr(trtp.op, ns, space)
            if hasattr(space, name):
                raise ValueError(f"already has a definition for '{name}'")
            sig = inspect.signature(fn)
            _params(fn)
            tensors = [p.name for p in sig.parameters.values() if p.annotation is TensorDesc]
            trtp.defs.update(id=plugin_id, register=fn, inputs=tensors,
                             attrs={p.name: p.annotation for p in sig.parameters.values() if p.name not in tensors})
            assert sig.return_annotation is TensorDesc
            setattr(space, name, fn)
            return fn
        return deco

    def impl(plugin_id):
        def deco(fn):
            _attr_subset(fn, _params(fn), ["outputs", "stream", "tactic"])
            trtp.defs["impl"] = fn
            return fn
        return deco

    def aot_impl(plugin_id):
        def deco(fn):
            _attr_subset(fn, _params(fn), ["outputs", "tactic"])
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
            trtp.defs["aot_impl"] = fn
            return fn
        return deco

    def autotune(plugin_id):
        def deco(fn):
            _attr_subset(fn, _params(fn), ["outputs"])
            trtp.defs["autotune"] = fn
            return fn
        return deco

    trtp.register, trtp.impl, trtp.autotune = register, impl, autotune
    if aot:
        trtp.aot_impl = aot_impl
    return trt, trtp


@pytest.fixture
def fake_trt(monkeypatch):
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(plugins, "_registered", False)
    return trt, trtp


def _descs(trt, B=1, H=12, L=333, D=128, n=2, block_q=128, dtype="bfloat16"):
    from tensorrt.plugin import TensorDesc

    t = getattr(trt, dtype)
    qkv = [TensorDesc((B, H, L, D), t) for _ in range(3)]
    return qkv + [TensorDesc((B, H, math.ceil(L / block_q), n), trt.int32),
                  TensorDesc((B, H, 1, D), trt.float32), TensorDesc((B, H, 1, D), trt.float32)]


# --- without TensorRT ----------------------------------------------------------------------------------

def test_module_imports_without_tensorrt_or_torch():
    code = ("import sys; sys.modules['tensorrt'] = None; import turbotrt.plugins.trt as m; "
            "assert callable(m.register_plugins); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_without_tensorrt_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(RuntimeError, match=r"`tensorrt` Python package \(TensorRT >= 10\.9"):
        plugins.register_plugins()


def test_register_with_old_tensorrt_names_the_version(monkeypatch):
    trt, trtp = _fake_tensorrt(version="10.7.0", aot=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    with pytest.raises(RuntimeError, match=r"TensorRT 10\.7\.0 lacks tensorrt\.plugin\.aot_impl.*>= 10\.9"):
        plugins.register_plugins()


def test_registration_follows_the_contract(fake_trt):
    trt, trtp = fake_trt
    plugins.register_plugins()
    d = trtp.defs
    assert d["id"] == C.PLUGIN_NAME == "turbodiffusion::SageSLA"
    assert d["inputs"] == INPUTS and d["attrs"] == ATTRS
    assert all(k in d for k in ("register", "autotune", "aot_impl", "impl"))
    out = d["register"](*_descs(trt), block_q=128, block_k=64, kept_blocks=2, sm_scale=128**-0.5, quant="int8_fp8")
    assert out.shape_expr == (1, 12, 333, 128) and out.dtype == trt.bfloat16
    with pytest.raises(ValueError, match="quant mode"):
        d["register"](*_descs(trt), block_q=128, block_k=64, kept_blocks=2, sm_scale=0.1, quant="int4")


def test_register_plugins_is_idempotent(fake_trt):
    trt, trtp = fake_trt
    plugins.register_plugins()
    plugins.register_plugins()
    plugins._registered = False  # e.g. a reloaded module: TensorRT still holds the definition
    plugins.register_plugins()
    assert plugins.is_registered(trtp)


@pytest.mark.parametrize("quant, tactics", [("none", [1, 3]), ("int8_fp8", [1, 2, 3])])
def test_autotune_declares_types_and_tactics(fake_trt, quant, tactics):
    trt, trtp = fake_trt
    plugins.register_plugins()
    (combo,) = trtp.defs["autotune"](*_descs(trt), quant, ())
    types_ = [t.strip() for t in combo.io_types.split(",")]
    assert types_ == ["FP16|BF16|FP32"] * 3 + ["INT32", "FP32", "FP32", "FP16|BF16|FP32"]
    assert combo.layouts == "LINEAR" and combo.tactics == tactics


def test_tactic_configs():
    assert plugins.tactic_config(0, 128, 128) == (8, 1)  # TensorRT's default tactic
    assert plugins.tactic_config(2, 128, 128) == (8, 2)
    assert plugins.tactic_config(3, 128, 128) == (4, 1)
    assert plugins.tactic_config(3, 64, 128) == (8, 1)


def test_aot_impl_returns_the_launchable_kernel(fake_trt, monkeypatch):
    pytest.importorskip("triton", reason="AOT compilation needs triton")
    from turbotrt.plugins.sagesla import aot, kernels

    if kernels.interpreted():
        pytest.skip("AOT compilation needs Triton's compiler, not the interpreter")
    trt, trtp = fake_trt
    plugins.register_plugins()
    monkeypatch.setattr(plugins, "_build_target", lambda: "sm_90")
    B, H, L, n = 1, 12, 32760, 51
    name, ptx, launch, extra = trtp.defs["aot_impl"](*_descs(trt, B, H, L, 128, n, 64), 64, 128, 128**-0.5,
                                                     "int8_fp8", (), 1)
    kernel = aot.compile_ptx("sm_90", 64, 128, 128, "int8_fp8", "bfloat16", sm_scale=128**-0.5,
                             num_warps=4, num_stages=1)
    assert name == kernel.name and ptx == kernel.launch_ptx
    assert aot.entry_params(ptx, name) == [(p.ptx_type, p.ptx_name) for p in kernel.launch_params]
    assert (launch.grid_x, launch.grid_y, launch.block_x) == (512, 12, 128)  # ceil(32760/64), B*H, 4 warps
    assert launch.shared_mem == kernel.shared_mem
    assert [e.value for e in extra] == [L, n]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the JIT implementation launches a CUDA kernel")
def test_jit_impl_matches_the_kernel(fake_trt):
    from turbotrt.plugins.sagesla import kernels

    trt, trtp = fake_trt
    plugins.register_plugins()
    q, k, v = (torch.randn(1, 2, 333, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    idx = torch.tensor([[0, 5], [1, 5], [2, 4]], device="cuda", dtype=torch.int32).expand(1, 2, 3, 2).contiguous()
    k_mean, v_amax = k.float().mean(-2, keepdim=True), v.float().abs().amax(-2, keepdim=True)
    out = torch.empty_like(q)

    def wrap(t):
        dtypes = {torch.bfloat16: trt.bfloat16, torch.int32: trt.int32, torch.float32: trt.float32}
        return types.SimpleNamespace(dtype=dtypes[t.dtype], shape=tuple(t.shape), data_ptr=t.data_ptr())

    stream = torch.cuda.current_stream().cuda_stream
    trtp.defs["impl"](*map(wrap, (q, k, v, idx, k_mean, v_amax)), 128, 64, 128**-0.5, "int8_fp8",
                      (wrap(out),), stream, 1)
    torch.cuda.synchronize()
    want = kernels.sagesla_forward(q, k, v, idx, k_mean, v_amax, 128, 64, 128**-0.5, "int8_fp8", fused=True)
    assert torch.equal(out, want)


# --- with TensorRT --------------------------------------------------------------------------------------

_NO_TRT = "TensorRT is not installed (it cannot be pip-installed on CI machines); runs where it is"


@pytest.mark.tensorrt
def test_real_tensorrt_registration_is_idempotent():
    pytest.importorskip("tensorrt", reason=_NO_TRT)
    import tensorrt.plugin as trtp

    plugins.register_plugins()
    plugins.register_plugins()
    assert plugins.is_registered(trtp)
    assert dict(trtp.op.turbodiffusion.SageSLA.input_attrs) == ATTRS


@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="building an engine needs a GPU")
def test_real_tensorrt_aot_engine_matches_the_kernel():
    trt = pytest.importorskip("tensorrt", reason=_NO_TRT)
    import tensorrt.plugin as trtp

    from turbotrt.plugins.sagesla import kernels

    plugins.register_plugins()
    B, H, L, D, bq, bk, n = 1, 2, 333, 128, 128, 64, 2
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16) for _ in range(3))
    idx = torch.tensor([[0, 5], [1, 5], [2, 4]], device="cuda", dtype=torch.int32).expand(B, H, 3, n).contiguous()
    stats = (k.float().mean(-2, keepdim=True), v.float().abs().amax(-2, keepdim=True))
    feeds = dict(zip(INPUTS, (q, k, v, idx, *stats)))

    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) | \
        (1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS))
    network = builder.create_network(flags)
    dtypes = {torch.float16: trt.float16, torch.int32: trt.int32, torch.float32: trt.float32}
    inputs = [network.add_input(name, dtypes[t.dtype], tuple(t.shape)) for name, t in feeds.items()]
    layer = network.add_plugin(trtp.op.turbodiffusion.SageSLA(*inputs, block_q=bq, block_k=bk, kept_blocks=n,
                                                              sm_scale=D**-0.5, quant="int8_fp16"), aot=True)
    layer.get_output(0).name = "o_s"
    network.mark_output(layer.get_output(0))
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
        builder.build_serialized_network(network, builder.create_builder_config()))
    context = engine.create_execution_context()
    out = torch.empty_like(q)
    for name, t in {**feeds, "o_s": out}.items():
        context.set_tensor_address(name, t.data_ptr())
    context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = kernels.sagesla_forward(q, k, v, idx, *stats, bq, bk, D**-0.5, "int8_fp16", fused=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
