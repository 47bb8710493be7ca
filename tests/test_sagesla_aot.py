"""AOT compilation of the SageSLA kernel to PTX for every supported target, on a machine without a GPU."""

import hashlib
import json
import os
import re

import pytest

pytest.importorskip("triton", reason="AOT compilation needs triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("AOT compilation needs Triton's compiler; TRITON_INTERPRET=1 replaces it with the interpreter",
                allow_module_level=True)

from turbotrt.plugins.sagesla import aot  # noqa: E402
from turbotrt.core import sagesla as C  # noqa: E402

# What TurboDiffusion would run on each target: FP8 V where the hardware has FP8 (fp16 V on
# sm80/86), 64/128 blocks on sm90 and 128/64 elsewhere.
TARGET_CONFIGS = {
    "sm_80": ((128, 64), "int8_fp16"),
    "sm_86": ((128, 64), "int8_fp16"),
    "sm_89": ((128, 64), "int8_fp8"),
    "sm_90": ((64, 128), "int8_fp8"),
    "sm_100": ((128, 64), "int8_fp8"),
    "sm_120": ((128, 64), "int8_fp8"),
}


def _entry(ptx: str, name: str) -> list[tuple[str, str]]:
    m = re.search(r"\.visible\s+\.entry\s+" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    assert m, f".visible .entry {name}(...) not found"
    return [(d.split()[1], d.split()[-1]) for d in m.group(1).split(",")]


@pytest.mark.parametrize("target", aot.SUPPORTED_TARGETS)
def test_compiles_for_every_target(target):
    (bq, bk), quant = TARGET_CONFIGS[target]
    kernel = aot.compile_ptx(target, bq, bk, 128, quant, "bfloat16")
    ptx = kernel.ptx

    # .version / .target: what a loader checks against the driver before JIT-compiling the PTX.
    assert re.search(r"^\.version (\d+\.\d+)$", ptx, re.M).group(1) == kernel.ptx_version
    assert tuple(map(int, kernel.ptx_version.split("."))) >= (7, 0)
    # sm_90 and newer get arch-specific ("a") PTX: wgmma/tcgen05 only exist there.
    want_target = target + ("a" if int(target[3:]) >= 90 else "")
    assert re.search(r"^\.target (\w+)", ptx, re.M).group(1) == want_target == kernel.ptx_target

    # The entry: 6 input pointers, int32 L and n, the output pointer, then Triton's two scratch pointers.
    params = _entry(ptx, kernel.name)
    assert [t for t, _ in params] == [".u64"] * 6 + [".u32"] * 2 + [".u64"] + [".u64"] * 2
    assert [p.role for p in kernel.params] == ["input"] * 6 + ["scalar"] * 2 + ["output"] + ["scratch"] * 2
    assert [p.name for p in kernel.params] == list(aot.KERNEL_ARGS + aot.SCRATCH_ARGS)
    assert [p.ptx_name for p in kernel.params] == [n for _, n in params]

    # What TensorRT launches: the same entry minus the scratch pointers, which the body never reads.
    launch = _entry(kernel.launch_ptx, kernel.name)
    assert launch == params[:9]
    for p in kernel.params[9:]:
        assert p.ptx_name not in kernel.launch_ptx

    assert kernel.sha256 == hashlib.sha256(ptx.encode()).hexdigest()
    assert kernel.threads == kernel.num_warps * 32 and kernel.num_warps in (4, 8)
    # The entry demands exactly this block size: the launch's block_x must match it.
    assert int(re.search(r"\.reqntid (\d+)", ptx).group(1)) == kernel.threads
    assert 0 < kernel.shared_mem <= aot.PORTABLE_SHARED_MEM  # TurboDiffusion's configs need no opt-in
    assert kernel.grid == ("cdiv(L, block_q)", "B * H", "1")
    assert kernel.grid_dims(1, 12, 32760) == (C.cdiv(32760, bq), 12, 1)
    json.dumps(kernel.to_dict())  # the bundle records it as JSON


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float_path_compiles(dtype):
    kernel = aot.compile_ptx("sm_80", 128, 64, 64, "none", dtype)
    assert [t for t, _ in _entry(kernel.launch_ptx, kernel.name)] == [".u64"] * 6 + [".u32"] * 2 + [".u64"]


def test_fp8_needs_an_fp8_target():
    with pytest.raises(ValueError, match="sm_80 has no FP8.*int8_fp16"):
        aot.compile_ptx("sm_80", 128, 64, 128, "int8_fp8", "bfloat16")


@pytest.mark.parametrize("target", ["sm_75", "sm_87", "sm_90a", "90"])
def test_unsupported_target_lists_the_supported_ones(target):
    with pytest.raises(ValueError, match="sm_80, sm_86, sm_89, sm_90, sm_100, sm_120"):
        aot.compile_ptx(target, 128, 64, 128, "none", "float16")
    with pytest.raises(ValueError, match="supported"):
        aot.target_for_capability(7, 5)
    assert aot.target_for_capability(12, 0) == "sm_120"


@pytest.mark.parametrize("args, match", [
    ((64, 64, 128, "none", "float16"), "block_q, block_k"),
    ((128, 64, 96, "none", "float16"), "head_dim"),
    ((128, 64, 128, "int4", "float16"), "quant mode"),
    ((128, 64, 128, "none", "float64"), "dtype"),
])
def test_rejects_configs_outside_the_contract(args, match):
    with pytest.raises(ValueError, match=match):
        aot.compile_ptx("sm_90", *args)


def test_scratch_parameters_are_kept_when_the_body_reads_them():
    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_1\n)\n{\n\tld.param.u64 %rd1, [k_param_1];\n}\n")
    with pytest.raises(RuntimeError, match="k_param_1 is used"):
        aot.strip_scratch_params(ptx, ["k_param_1"])
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert aot.entry_params(aot.strip_scratch_params(unused, ["k_param_1"]), "k") == [(".u64", "k_param_0")]
