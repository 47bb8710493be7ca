"""TensorRT plugin definitions (`tensorrt.plugin`, TensorRT >= 10.9) for the project's custom ops.

`register_plugins()` defines `turbodiffusion::SageSLA` (see `turbotrt.plugins.sagesla.contract`):
- register: one output shaped and typed like q;
- autotune: q/k/v/o_s in fp16, bf16 or fp32 together, block_idx int32, k_mean/v_amax fp32, LINEAR;
  tactics are kernel configurations (warps, pipeline stages) of the contract's fixed block geometry;
- aot_impl: the Triton kernel compiled to PTX for the building GPU (`sagesla.aot`), launched on
  grid (ceil(L/block_q), B*H) with L and n as extra int32 arguments; the engine embeds the PTX and runs
  it from plain libnvinfer, without Python;
- impl: a JIT fallback that launches the same Triton kernel through torch.

With both implementations defined, TensorRT needs a preference: create the network with
`NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS`, or mark the ONNX node with `aot=1`
(`network.add_plugin(..., aot=True)` from the network API).
TensorRT is imported only by `register_plugins()`; importing this module needs neither TensorRT nor a GPU.
"""

from typing import List, Tuple, Union

from turbotrt.core import sagesla as C

MIN_TENSORRT = (10, 9)  # tensorrt.plugin.aot_impl
# tactic -> (num_warps or None for the kernel's default, num_stages)
TACTICS = {1: (None, 1), 2: (None, 2), 3: ("alt", 1)}
FLOAT_TYPES = "FP16|BF16|FP32"  # q, k, v and o_s share one of these

_registered = False


def tactic_config(tactic: int, block_q: int, head_dim: int) -> Tuple[int, int]:
    """(num_warps, num_stages) of a tactic; 0 (TensorRT's default tactic) is tactic 1."""
    from turbotrt.plugins.sagesla.kernels import default_num_warps

    warps, stages = TACTICS.get(tactic or 1, TACTICS[1])
    default = default_num_warps(block_q, head_dim)
    if warps == "alt":
        warps = 4 if default > 4 else 8
    return warps or default, stages


def tactics_for(quant: str) -> List[int]:
    # The float path's 16-bit Q, K and V tiles take 64-128 KiB of shared memory at D=128 with one
    # stage already: no second stage for it.
    return [1, 3] if quant == "none" else [1, 2, 3]


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(
            "turbotrt's TensorRT plugins need the `tensorrt` Python package (TensorRT >= 10.9, "
            f"e.g. `pip install 'turbotrt[gpu]'`); importing it failed: {e}") from e
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise RuntimeError(f"TensorRT {trt.__version__} has no `tensorrt.plugin` module; "
                           f"TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} is required: {e}") from e
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT or not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"TensorRT {trt.__version__} lacks tensorrt.plugin.aot_impl; "
                           f"TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} is required")
    return trt, trtp


def is_registered(trtp) -> bool:
    """Whether `turbodiffusion::SageSLA` is already defined in this process's tensorrt.plugin."""
    return hasattr(trtp.op, C.PLUGIN_NAMESPACE) and hasattr(getattr(trtp.op, C.PLUGIN_NAMESPACE), C.OP_TYPE)


def register_plugins() -> None:
    """Define the plugins once per process; later calls do nothing. Raises RuntimeError naming what is
    missing when TensorRT (>= 10.9, with tensorrt.plugin) cannot be imported."""
    global _registered
    trt, trtp = _import_tensorrt()
    if _registered or is_registered(trtp):  # tensorrt.plugin refuses a second definition
        _registered = True
        return
    _define_sagesla(trt, trtp)
    _registered = True


def _build_target() -> str:
    """The `sm_XY` target of the GPU building the engine (the PTX must match it)."""
    import triton

    from turbotrt.plugins.sagesla import aot

    arch = triton.runtime.driver.active.get_current_target().arch
    return aot.target_for_capability(arch // 10, arch % 10)


def _torch_view(t, trt):
    """A torch view of a `trtp.Tensor`. Its __cuda_array_interface__ refuses bf16, so describe the
    buffer as raw 16-bit integers and reinterpret."""
    import torch

    dtypes = {trt.float16: (torch.float16, "<f2"), trt.bfloat16: (torch.bfloat16, "<i2"),
              trt.float32: (torch.float32, "<f4"), trt.int32: (torch.int32, "<i4")}
    torch_dtype, typestr = dtypes[t.dtype]

    class _Buffer:
        __cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr, False),
                                    "strides": None, "version": 3}

    return torch.as_tensor(_Buffer(), device="cuda").view(torch_dtype)


def _define_sagesla(trt, trtp) -> None:
    name = C.PLUGIN_NAME
    dtype_names = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32"}

    def static_head_dim(desc) -> int:
        d = desc.shape_expr[3]
        if not d.is_constant:
            raise ValueError("SageSLA needs a static head_dim (the last dim of q) to build its kernel")
        return int(d.constant_value)

    @trtp.register(name)
    def sagesla_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, block_idx: trtp.TensorDesc,
                     k_mean: trtp.TensorDesc, v_amax: trtp.TensorDesc, block_q: int, block_k: int,
                     kept_blocks: int, sm_scale: float, quant: str) -> trtp.TensorDesc:
        C.SageSLAAttrs(block_q=block_q, block_k=block_k, kept_blocks=kept_blocks, sm_scale=sm_scale, quant=quant)
        return q.like()

    @trtp.autotune(name)
    def sagesla_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                         block_idx: trtp.TensorDesc, k_mean: trtp.TensorDesc, v_amax: trtp.TensorDesc,
                         quant: str, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        types = ", ".join([FLOAT_TYPES] * 3 + ["INT32", "FP32", "FP32", FLOAT_TYPES])
        return [trtp.AutoTuneCombination(types, "LINEAR", tactics_for(quant))]

    @trtp.aot_impl(name)
    def sagesla_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, block_idx: trtp.TensorDesc,
                    k_mean: trtp.TensorDesc, v_amax: trtp.TensorDesc, block_q: int, block_k: int,
                    sm_scale: float, quant: str, outputs: Tuple[trtp.TensorDesc], tactic: int
                    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        from turbotrt.plugins.sagesla import aot

        head_dim = static_head_dim(q)
        warps, stages = tactic_config(tactic, block_q, head_dim)
        kernel = aot.compile_ptx(_build_target(), block_q, block_k, head_dim, quant, dtype_names[q.dtype],
                                 sm_scale=sm_scale, num_warps=warps, num_stages=stages)
        L = q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(L, block_q)
        launch.grid_y = q.shape_expr[0] * q.shape_expr[1]
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared_mem
        # Kernel arguments: the 6 inputs, then these int32 scalars, then o_s (AotKernel.launch_params).
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(L)
        extra[1] = trtp.SymInt32(block_idx.shape_expr[3])
        return kernel.name, kernel.launch_ptx, launch, extra

    @trtp.impl(name)
    def sagesla_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, block_idx: trtp.Tensor,
                     k_mean: trtp.Tensor, v_amax: trtp.Tensor, block_q: int, block_k: int, sm_scale: float,
                     quant: str, outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
        import torch

        from turbotrt.plugins.sagesla import kernels

        head_dim = int(q.shape[3])
        warps, stages = tactic_config(tactic, block_q, head_dim)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [_torch_view(t, trt) for t in (q, k, v, block_idx, k_mean, v_amax)]
            kernels.sagesla_forward(*args, block_q, block_k, sm_scale, quant, fused=True, num_warps=warps,
                                    num_stages=stages, out=_torch_view(outputs[0], trt))
