"""Ahead-of-time compilation of the SageSLA kernel to PTX, with no GPU present.

`compile_ptx` runs Triton's compiler for an explicit target and returns an `AotKernel`: the PTX and
everything a launcher needs (entry name, parameter list, grid formula, threads, dynamic shared
memory, the int32 scalars to pass) plus what a loader must check (PTX ISA version and `.target`).

The kernel is `kernels._sagesla_fwd_kernel`. Its parameters are the contract's inputs, two int32
scalars and the output, which is the order a TensorRT AOT plugin passes them in:

    q, k, v, block_idx, k_mean, v_amax   pointers   (plugin inputs 0..5)
    L, n                                 int32      (extra args: q.shape[2], block_idx.shape[3])
    o_s                                  pointer    (plugin output 0)
    global_scratch, profile_scratch      pointers   (appended by recent Triton to every entry)

grid = (ceil(L / block_q), B * H, 1), block = (num_warps * 32, 1, 1).

The kernel uses neither scratch buffer (no TMA descriptors, no profiling), so the two trailing
parameters are never read; `AotKernel.launch_ptx` removes them from the entry after checking that,
which makes the entry's parameters exactly what TensorRT passes. A launcher that keeps `ptx` as Triton
wrote it must pass two null pointers after o_s instead.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import asdict, dataclass

from turbotrt.core import sagesla as C

SUPPORTED_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
FP8_TARGETS = ("sm_89", "sm_90", "sm_100", "sm_120")  # e4m3 conversions and MMA: Ada and newer
_TL_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
KERNEL_ARGS = ("q", "k", "v", "block_idx", "k_mean", "v_amax", "L", "n", "o_s")
SCALAR_ARGS = ("L", "n")
SCRATCH_ARGS = ("global_scratch", "profile_scratch")
GRID = ("cdiv(L, block_q)", "B * H", "1")
PORTABLE_SHARED_MEM = 48 * 1024  # above this a launcher must opt in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)


@dataclass(frozen=True)
class AotParam:
    name: str  # the kernel argument (or Triton's scratch pointer) it carries
    ptx_name: str  # the .param's name in the PTX entry
    ptx_type: str  # ".u64" for pointers, ".u32" for int32 scalars
    role: str  # "input" | "scalar" | "output" | "scratch"


@dataclass(frozen=True)
class AotKernel:
    name: str  # the .entry name
    ptx: str  # as Triton wrote it (with the two scratch parameters)
    ptx_version: str  # PTX ISA of `.version`, e.g. "8.8": the driver must be able to JIT it
    target: str  # the requested target, e.g. "sm_90"
    ptx_target: str  # the `.target` line, e.g. "sm_90a" (arch-specific: runs on that arch only)
    num_warps: int
    num_stages: int
    shared_mem: int  # dynamic shared memory bytes per program
    params: tuple[AotParam, ...]
    grid: tuple[str, str, str]
    block_q: int
    block_k: int
    head_dim: int
    quant: str
    dtype: str
    sm_scale: float
    sha256: str  # of `ptx`

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    @property
    def launch_params(self) -> tuple[AotParam, ...]:
        """The parameters of `launch_ptx`: inputs, int32 scalars, output (no scratch)."""
        return tuple(p for p in self.params if p.role != "scratch")

    @property
    def needs_shared_mem_opt_in(self) -> bool:
        return self.shared_mem > PORTABLE_SHARED_MEM

    @functools.cached_property
    def launch_ptx(self) -> str:
        """`ptx` with the unused trailing scratch parameters removed from the entry."""
        return strip_scratch_params(self.ptx, [p.ptx_name for p in self.params if p.role == "scratch"])

    def grid_dims(self, batch: int, heads: int, length: int) -> tuple[int, int, int]:
        return (C.cdiv(length, self.block_q), batch * heads, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ptx")
        d.update(threads=self.threads, launch_sha256=hashlib.sha256(self.launch_ptx.encode()).hexdigest(),
                 needs_shared_mem_opt_in=self.needs_shared_mem_opt_in, scalar_args=list(SCALAR_ARGS))
        return d


def target_for_capability(major: int, minor: int) -> str:
    """`sm_XY` for a compute capability, checked against the supported targets."""
    target = f"sm_{major}{minor}"
    _check_target(target)
    return target


def _check_target(target: str) -> int:
    if target not in SUPPORTED_TARGETS:
        raise ValueError(f"unsupported SageSLA target {target!r}; supported: {', '.join(SUPPORTED_TARGETS)}")
    return int(target[3:])


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _TL_DTYPES:
        raise ValueError(f"SageSLA dtype must be one of {', '.join(C.FLOAT_DTYPES)}, got {dtype!r}")
    return name


def entry_params(ptx: str, name: str) -> list[tuple[str, str]]:
    """[(ptx_type, ptx_name)] of the `.entry name(...)` parameter list."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    decls = [d.split() for d in m.group(1).split(",") if d.strip()]
    return [(d[1], d[-1]) for d in decls]  # ".param .u64 [.ptr .global .align 1] name"


def strip_scratch_params(ptx: str, names: list[str]) -> str:
    """Remove trailing entry parameters `names` after checking nothing but their declaration names them."""
    out = ptx
    for name in names:
        uses = len(re.findall(r"\b" + re.escape(name) + r"\b", ptx))
        if uses != 1:
            raise RuntimeError(f"PTX parameter {name} is used by the kernel body ({uses - 1} references); "
                               "it cannot be dropped and the launcher must pass a scratch buffer")
        out, n = re.subn(r",\s*\.param\s+\.u64\b[^,()]*?\b" + re.escape(name) + r"\b", "", out)
        if n != 1:
            raise RuntimeError(f"could not remove PTX parameter {name}")
    return out


@functools.lru_cache(maxsize=None)
def compile_ptx(target: str, block_q: int, block_k: int, head_dim: int, quant: str, dtype,
                sm_scale: float | None = None, num_warps: int | None = None,
                num_stages: int = 1) -> AotKernel:
    """Compile `_sagesla_fwd_kernel` for `target` (one of SUPPORTED_TARGETS) without a GPU.

    num_stages defaults to 1: the loop's loads hang off a block index read in the same iteration, and
    one stage keeps the quantized paths within the portable 48 KiB of shared memory.
    """
    cc = _check_target(target)
    dtype = _dtype_name(dtype)
    if quant not in C.QUANT_MODES:
        raise ValueError(f"unknown SageSLA quant mode {quant!r}; valid: {', '.join(C.QUANT_MODES)}")
    if quant == "int8_fp8" and target not in FP8_TARGETS:
        raise ValueError(f"{target} has no FP8: int8_fp8 needs one of {', '.join(FP8_TARGETS)}; "
                         "use quant='int8_fp16' (or 'none') there")
    if (block_q, block_k) not in C.KERNEL_GEOMETRIES:
        raise ValueError(f"(block_q, block_k) must be one of {C.KERNEL_GEOMETRIES}, got {(block_q, block_k)}")
    if head_dim not in C.HEAD_DIMS:
        raise ValueError(f"SageSLA kernels are built for head_dim {C.HEAD_DIMS}, got {head_dim}")
    if sm_scale is None:
        sm_scale = head_dim**-0.5

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbotrt.plugins.sagesla import kernels as K

    if K.interpreted():
        raise RuntimeError("AOT compilation needs Triton's compiler, but TRITON_INTERPRET was set when "
                           "triton was imported")
    fn = K._sagesla_fwd_kernel
    t = _TL_DTYPES[dtype]
    ptr = {"q": t, "k": t, "v": t, "block_idx": "i32", "k_mean": "fp32", "v_amax": "fp32", "o_s": t}
    names = dict(zip(KERNEL_ARGS, fn.arg_names))  # contract name -> kernel argument name
    signature = {names[a]: ("i32" if a in SCALAR_ARGS else "*" + ptr[a]) for a in KERNEL_ARGS}
    constexprs = dict(BLOCK_Q=block_q, BLOCK_K=block_k, D=head_dim, QUANT=K.QUANT_CODES[quant],
                      QK_SCALE=K.qk_scale_log2(sm_scale), DOT_PRECISION=K.dot_precision(dtype),
                      INTERPRET=False)
    signature.update({k: "constexpr" for k in constexprs})
    # TensorRT allocates every binding 256-byte aligned: let Triton vectorise pointer accesses.
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(KERNEL_ARGS) if a not in SCALAR_ARGS}
    num_warps = num_warps or K.default_num_warps(block_q, head_dim)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False))
    ptx = compiled.asm["ptx"]
    name = compiled.metadata.name
    declared = entry_params(ptx, name)
    n_scratch = len(declared) - len(KERNEL_ARGS)  # 2 with Triton 3.9; older releases append fewer
    if not 0 <= n_scratch <= len(SCRATCH_ARGS) or any(t != ".u64" for t, _ in declared[len(KERNEL_ARGS):]):
        raise RuntimeError(f"unexpected PTX entry parameters for {name}: {declared}")
    roles = ["input"] * 6 + ["scalar"] * 2 + ["output"] + ["scratch"] * n_scratch
    params = tuple(AotParam(arg, pname, ptype, role)
                   for arg, (ptype, pname), role in zip(KERNEL_ARGS + SCRATCH_ARGS, declared, roles))
    return AotKernel(
        name=name, ptx=ptx, ptx_version=re.search(r"^\s*\.version\s+(\S+)", ptx, re.M).group(1),
        target=target, ptx_target=re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1),
        num_warps=compiled.metadata.num_warps, num_stages=num_stages, shared_mem=compiled.metadata.shared,
        params=params, grid=GRID, block_q=block_q, block_k=block_k, head_dim=head_dim, quant=quant,
        dtype=dtype, sm_scale=float(sm_scale), sha256=hashlib.sha256(ptx.encode()).hexdigest(),
    )
