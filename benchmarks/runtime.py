"""The runtime's start-up and attention costs on a CPU: what the user cache saves, and what sla buys.

For a bundle, with ONNX Runtime's CPU provider:
  verification   `Bundle.load(verify=True)` cold (empty user cache: every file hashed) vs warm (stamps)
  sessions       per graph: creation without the cache, cold (optimize, save the optimized model), and
                 warm (load the saved model, graph optimization off)
and on the attention op alone (the DiT's self-attention, 1.3B's head layout H=12, D=128, fp32):
  attention      sla (the exported op: block map, SageSLA function body, linear branch) vs dense
                 softmax attention at each L, timed interleaved; ratio dense/sla with its spread
Cold and warm runs alternate, each cold one with a fresh cache folder; times are medians of --repeat.

    python benchmarks/runtime.py BUNDLE                        # any bundle (a tiny one for a quick look)
    python benchmarks/runtime.py --export --workdir DIR        # wan2.1-t2v-1.3b: random bf16 checkpoint,
                                                               # exported fp32 at 480p / 81 frames (~6 GB)
    python benchmarks/runtime.py --parts attention --lengths 6240 12480 32760

L = 6240, 12480, 32760 are 1.3B's sequence lengths at 480p for 13, 29 and 81 frames. Dense attention
holds 2*H*L^2 fp32 scores and probabilities (14 GiB at L = 12480, 96 GiB at 32760): a length whose
dense graph would need more than --max-gib (default 8) is timed for sla only, and says so; pass
--max-gib 16 on a 24 GiB machine to time dense at L = 12480.
Writes benchmarks/results/runtime.json (merged by key).
Not a test: the 1.3B parts take tens of minutes and ~15 GB of disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADS, HEAD_DIM = 12, 128  # Wan2.1 1.3B
LENGTHS = (6240, 12480, 32760)


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def _use_cache(folder: Path) -> None:
    os.environ["TURBOTRT_CACHE"] = str(folder)


# --- the bundle ------------------------------------------------------------------------------------------

def export_full(workdir: Path) -> Path:
    """wan2.1-t2v-1.3b from a seeded random bf16 checkpoint, fp32 sla at 480p / 81 frames (DiT only)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, out = workdir / "wan2.1-t2v-1.3b-random-bf16.safetensors", workdir / "wan2.1-t2v-1.3b-480p-fp32"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "turbotrt.cli", "random-checkpoint", str(ckpt), "--preset",
                        "wan2.1-t2v-1.3b"], check=True)
    if not out.exists():
        from turbotrt.export.api import export

        t = time.perf_counter()
        export(str(ckpt), out, resolution="480p", frames=81, precision="fp32", attention="sla", validate=False,
               log=lambda m: print(f"  {m}", flush=True))
        print(f"exported {out} in {time.perf_counter() - t:.0f} s")
    return out


def _settle(bundle: Path) -> None:
    """Stamps skip files modified in the last SETTLE_NS (file times are coarse): wait that out once."""
    from turbotrt.core.stamps import SETTLE_NS

    newest = max(p.stat().st_mtime_ns for p in bundle.rglob("*") if p.is_file())
    wait = (newest + SETTLE_NS - time.time_ns()) / 1e9 + 0.1
    if wait > 0:
        time.sleep(wait)


def verification(bundle: Path, repeat: int, scratch: Path) -> dict:
    from turbotrt.core.bundle import Bundle

    _settle(bundle)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    cold, warm, none = [], [], []
    for r in range(repeat):
        _use_cache(scratch / f"verify-{r}")
        for times, verify in ((cold, True), (warm, True), (none, False)):
            t = time.perf_counter()
            Bundle.load(bundle, verify=verify)
            times.append(time.perf_counter() - t)
    row = {"bundle_bytes": size, "cold_s": _spread(cold), "warm_s": _spread(warm), "no_verify_s": _spread(none),
           "cold_over_warm": round(statistics.median(cold) / statistics.median(warm), 1)}
    print(f"verification of {size / 1e9:.2f} GB (file pages cached), median of {repeat}:")
    print(f"  cold (hash every file)   {row['cold_s']['median']:9.3f} s")
    print(f"  warm (stamps)            {row['warm_s']['median']:9.3f} s   {row['cold_over_warm']}x faster")
    print(f"  --no-verify              {row['no_verify_s']['median']:9.3f} s")
    return row


def sessions(bundle_path: Path, repeat: int, scratch: Path, networks: list[str] | None) -> dict:
    from turbotrt.core.bundle import Bundle
    from turbotrt.runtime.backends import OrtBackend

    bundle = Bundle.load(bundle_path)
    out = {}
    print(f"session creation (ONNX Runtime CPU), median of {repeat}:")
    for network in networks or bundle.networks:
        runs = {"no_cache": [], "cold": [], "warm": []}
        for r in range(repeat):
            _use_cache(scratch / f"sessions-{network}-{r}")
            for kind, cache in (("no_cache", False), ("cold", True), ("warm", True)):
                backend = OrtBackend(bundle, ["CPUExecutionProvider"], cache=cache, log=lambda *_: None)
                t = time.perf_counter()
                backend.session(network)
                runs[kind].append(time.perf_counter() - t)
                del backend
                gc.collect()
        row = {k: _spread(v) for k, v in runs.items()}
        row["no_cache_over_warm"] = round(statistics.median(runs["no_cache"]) / statistics.median(runs["warm"]), 2)
        out[network] = row
        print(f"  {network:18s} no cache {row['no_cache']['median']:8.2f} s   cold (+save) {row['cold']['median']:8.2f} s"
              f"   warm {row['warm']['median']:8.2f} s   ({row['no_cache_over_warm']}x)")
    return out


# --- the attention op --------------------------------------------------------------------------------------

def _attention_graph(mode: str, L: int, topk: float, folder: Path) -> Path:
    """The DiT's attention op as its own graph, exported as the DiT's is: q, k, v [1, H, L, D] -> out."""
    import torch

    from turbotrt.core.configs import AttentionConfig
    from turbotrt.export.onnx_io import OPSET, attach_function, trace, write_model
    from turbotrt.models import attention as ref

    if mode == "dense":
        class Op(torch.nn.Module):
            def forward(self, q, k, v):
                return ref.dense_attention(q, k, v)

        module = Op()
    else:
        from turbotrt.export.sagesla_onnx import SageSLAExport

        module = SageSLAExport(ref.SparseLinearAttention(HEAD_DIM, AttentionConfig(mode="sla", topk=topk)))
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    shape = (1, HEADS, L, HEAD_DIM)
    args = tuple(torch.empty(shape, device="meta") for _ in range(3))
    traced = trace(module.to("meta"), args, ["q", "k", "v"], ["out"])
    if mode != "dense":
        from turbotrt.export.sagesla_onnx import attrs_for, function_body

        attach_function(traced.model, function_body(shape, torch.float32, attrs_for(shape, module.config), OPSET))
    return write_model(traced, folder / f"attention-{mode}-{L}.onnx", weights)


def attention(lengths: list[int], repeat: int, topk: float, max_gib: float, scratch: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    from turbotrt.runtime.backends import session_options

    out = {}
    print(f"attention op alone, H={HEADS} D={HEAD_DIM} fp32, sla topk {topk} vs dense, {repeat} interleaved pairs:")
    for L in lengths:
        dense_gib = 2 * HEADS * L * L * 4 / 2**30  # scores and probabilities, both held at once
        modes = ["sla"] + (["dense"] if dense_gib <= max_gib else [])
        runs, build = {}, {}
        for mode in modes:
            t = time.perf_counter()
            path = _attention_graph(mode, L, topk, scratch)
            sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
            build[mode] = round(time.perf_counter() - t, 2)
            runs[mode] = (sess, [])
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal((1, HEADS, L, HEAD_DIM), dtype=np.float32) for n in ("q", "k", "v")}
        for mode in modes:
            runs[mode][0].run(None, feeds)  # warm-up: first-run allocations
        for r in range(repeat):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                sess, times = runs[mode]
                t = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t)
        row = {f"{m}_s": _spread(runs[m][1]) for m in modes}
        row["export_and_session_s"] = build
        line = f"  L={L:6d}  sla {row['sla_s']['median'] * 1e3:9.1f} ms"
        if "dense" in runs:
            ratios = [d / s for d, s in zip(runs["dense"][1], runs["sla"][1])]
            row["dense_over_sla"] = _spread(ratios)
            line += (f"   dense {row['dense_s']['median'] * 1e3:9.1f} ms   dense/sla {row['dense_over_sla']['median']:.2f}x"
                     f" ({row['dense_over_sla']['min']:.2f}-{row['dense_over_sla']['max']:.2f})")
        else:
            row["dense_skipped"] = f"dense would hold ~{dense_gib:.0f} GiB of scores (> --max-gib {max_gib})"
            line += f"   dense skipped: {row['dense_skipped']}"
        print(line, flush=True)
        out[str(L)] = row
        del runs
        gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", type=Path, help="the bundle to measure (or --export)")
    ap.add_argument("--export", action="store_true", help="export the full-size 1.3B (fp32, 480p, 81 frames) first")
    ap.add_argument("--workdir", type=Path, default=Path("runtime-bench"), help="where --export writes")
    ap.add_argument("--parts", default="verification,sessions,attention",
                    help="comma-separated: verification, sessions, attention")
    ap.add_argument("--networks", nargs="*", help="sessions: only these graphs")
    ap.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS))
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-gib", type=float, default=8.0, help="skip dense attention needing more than this")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "runtime.json")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    unknown = parts - {"verification", "sessions", "attention"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    bundle = export_full(a.workdir) if a.export else a.bundle
    if bundle is None and parts & {"verification", "sessions"}:
        ap.error("pass a bundle, --export, or --parts attention")

    import onnxruntime

    from turbotrt.runtime.backends import spinning

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {_ram_gib():.1f} GiB RAM, Python "
               f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
               f"intra-op spinning {'on' if spinning() else 'off'}")
    print(machine)
    results = {}
    with tempfile.TemporaryDirectory(prefix="turbotrt-runtime-bench-") as scratch:
        scratch = Path(scratch)
        _use_cache(scratch / "setup")  # nothing of the benchmark's lands in the user's own cache
        if bundle is not None:
            from turbotrt.core.bundle import Bundle

            m = Bundle.load(bundle, verify=False).manifest
            key = f"{m.model.name}/{m.profile.name}/{m.precision}/{m.attention.mode}"
            print(f"bundle {bundle}: {key}")
            if "verification" in parts:
                results[f"verification/{key}"] = verification(bundle, a.repeat, scratch)
            if "sessions" in parts:
                results[f"sessions/{key}"] = sessions(bundle, a.repeat, scratch, a.networks)
        if "attention" in parts:
            for L, row in attention(a.lengths, a.repeat, a.topk, a.max_gib, scratch).items():
                results[f"attention/H{HEADS}-D{HEAD_DIM}-L{L}-topk{a.topk}"] = row
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS of the whole run {peak / 2**30:.2f} GiB")
    for row in results.values():
        row.update(machine=machine, run_peak_rss_bytes=peak, run_parts=sorted(parts))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(a.out.read_text()) if a.out.exists() else {}
    merged.update(results)
    a.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"recorded in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
