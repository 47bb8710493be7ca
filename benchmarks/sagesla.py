"""SageSLA (Triton) against dense attention (PyTorch SDPA, flash) and the SLA sparse core.

For each shape and topk: the block map is built once (not timed); every method then computes o_s
from q, k, v and the kept blocks. SageSLA's time includes K's mean and V's amax (inputs of the op).

    python benchmarks/sagesla.py --out results.json [--dtype bfloat16] [--quant auto]

Prints, per method: median ms (triton.testing.do_bench), TFLOP/s counted on the kept blocks only
(4*bq*bk*D per kept query-block/key-block pair: QK^T and PV), speedup over dense, and the cosine
similarity of the output with the SLA reference (`sparse_attention`, fp32 math). Needs a CUDA GPU;
exits with status 2 without one.
"""

import argparse
import json
import platform
import sys

SHAPES = [  # (B, H, L, D, topk)
    (1, 12, 32760, 128, 0.1),  # Wan2.1 1.3B, 480p
    (1, 12, 32760, 128, 0.15),
    (1, 40, 75600, 128, 0.1),  # Wan2.1 14B, 720p
    (1, 40, 75600, 128, 0.15),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quant", default="auto", choices=["auto", "int8_fp8", "int8_fp16"],
                        help="auto: int8_fp8 where the GPU has FP8 (sm_89+), int8_fp16 otherwise")
    parser.add_argument("--geometry", default="auto", choices=["auto", "128x64", "64x128"],
                        help="SageSLA blocks; auto: 64x128 on sm_90, 128x64 elsewhere (TurboDiffusion's choice)")
    parser.add_argument("--skip-reference-timing", action="store_true",
                        help="time the PyTorch SLA reference once instead of with do_bench (it is slow)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/sagesla.py needs a CUDA GPU; none is available", file=sys.stderr)
        return 2

    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from turbotrt.models import attention as ref
    from turbotrt.plugins.sagesla import kernels

    dtype = getattr(torch, args.dtype)
    cc = torch.cuda.get_device_capability()
    quant = args.quant if args.quant != "auto" else ("int8_fp8" if cc >= (8, 9) else "int8_fp16")
    if args.geometry == "auto":
        sage_geometry = (64, 128) if cc[0] == 9 else (128, 64)
    else:
        sage_geometry = tuple(int(x) for x in args.geometry.split("x"))
    sla_geometry = (128, 64)  # TurboDiffusion's `sla` blocks
    device = torch.cuda.get_device_name()
    print(f"{device} (sm_{cc[0]}{cc[1]}), torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype}, SageSLA {quant} {sage_geometry[0]}x{sage_geometry[1]}")

    records = []
    for B, H, L, D, topk in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        sm_scale = D**-0.5
        dense_flops = 4 * B * H * L * L * D

        def dense():
            return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            dense_ms = do_bench(dense, return_mode="median")

        runs = {}
        for label, (bq, bk), mode in [
            (f"sagesla {quant} (prequant)", sage_geometry, quant),
            (f"sagesla {quant} (fused, AOT kernel)", sage_geometry, quant),
            ("sla triton (none)", sla_geometry, "none"),
        ]:
            idx = ref.block_map(q, k, bq, bk, topk).to(torch.int32)
            fused = "fused" in label

            def run(idx=idx, bq=bq, bk=bk, mode=mode, fused=fused):
                k_mean = k.float().mean(dim=-2, keepdim=True)
                v_amax = v.float().abs().amax(dim=-2, keepdim=True)
                return kernels.sagesla_forward(q, k, v, idx, k_mean, v_amax, bq, bk, sm_scale, mode, fused=fused)

            runs[label] = (run, idx, bq, bk)

        # The SLA reference at the SageSLA geometry: what the low-bit outputs are compared with.
        idx_s, (bq_s, bk_s) = runs[f"sagesla {quant} (prequant)"][1], sage_geometry
        want_s = ref.sparse_attention(q, k, v, idx_s, bq_s, bk_s).float().flatten()
        idx_f = runs["sla triton (none)"][1]
        want_f = ref.sparse_attention(q, k, v, idx_f, *sla_geometry).float().flatten()

        def reference():
            return ref.sparse_attention(q, k, v, idx_f, *sla_geometry)

        if args.skip_reference_timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            reference()
            end.record()
            torch.cuda.synchronize()
            ref_ms = start.elapsed_time(end)
        else:
            ref_ms = do_bench(reference, warmup=1, rep=1, return_mode="median")

        rows = [("dense sdpa (flash)", dense_ms, dense_flops, 1.0)]
        for label, (run, idx, bq, bk) in runs.items():
            ms = do_bench(run, return_mode="median")
            want = want_f if label.startswith("sla") else want_s
            cos = F.cosine_similarity(run().float().flatten(), want, dim=0).item()
            rows.append((label, ms, 4 * idx.numel() * bq * bk * D, cos))
        rows.append(("sla reference (pytorch)", ref_ms, 4 * idx_f.numel() * sla_geometry[0] * sla_geometry[1] * D, 1.0))

        n_kept = runs["sla triton (none)"][1].shape[-1]
        print(f"\nB={B} H={H} L={L} D={D} topk={topk} (sla keeps {n_kept} key blocks per query block)")
        print(f"{'method':38s} {'ms':>9s} {'TFLOP/s':>9s} {'x dense':>8s} {'cos vs sla':>11s}")
        for label, ms, flops, cos in rows:
            tflops = flops / ms / 1e9
            print(f"{label:38s} {ms:9.3f} {tflops:9.1f} {dense_ms / ms:8.2f} {cos:11.6f}")
            records.append(dict(B=B, H=H, L=L, D=D, topk=topk, method=label, ms=ms, tflops=tflops,
                                speedup_vs_dense=dense_ms / ms, cos_vs_sla=cos))
        del q, k, v, runs, want_s, want_f
        torch.cuda.empty_cache()

    meta = dict(device=device, capability=f"sm_{cc[0]}{cc[1]}", torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), dtype=args.dtype, quant=quant,
                sagesla_geometry=list(sage_geometry), sla_geometry=list(sla_geometry),
                timing="triton.testing.do_bench median", flops="4*bq*bk*D per kept block pair; dense 4*L*L*D")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
