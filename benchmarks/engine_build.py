"""TensorRT for RTX engine builds at full size, on this (GPU-less) machine: wall time, peak RSS, size.

    python benchmarks/engine_build.py --preset wan2.1-t2v-1.3b --precision bf16 --target sm_120
    python benchmarks/engine_build.py --preset wan2.1-t2v-1.3b --precision int8 --target sm_120

Makes a random bf16 checkpoint of the preset (as benchmarks/export_memory.py does), exports the DiT
graph alone (ONNX only; int8: exported and calibrated with `--embeddings` of random prompt
embeddings, so no umT5 is needed), then builds its TensorRT for RTX engine in a child process and
records what the build cost: wall time and the child's peak RSS (getrusage), and the engine's size.
Each stage runs in its own process so one stage's memory does not hide another's. Results are
added to benchmarks/results/engine_build.json. Nothing is timed in tests; this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results") / "engine_build.json"

BUILD = """
import sys, time
from turbotrt.build.rtx import RtxOptions, build_rtx_engines
t = time.perf_counter()
r = build_rtx_engines(sys.argv[1], RtxOptions((sys.argv[2],), networks=("dit",)), log=lambda m: print(m, flush=True),
                      verify=False)
(entry,) = r.engines.values()
print("ENGINE_BYTES", entry.bytes, "ATTENTION", entry.attention, "BUILD_SECONDS", time.perf_counter() - t, flush=True)
"""


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def _child(args: list[str], what: str) -> tuple[float, int, str]:
    """(wall seconds, this child's own peak RSS in bytes, its output); exits with the output on failure."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not the max over all children
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{what} failed:\n{text[-3000:]}")
    print(f"  {what}: {wall:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    return wall, usage.ru_maxrss * 1024, text  # Linux: ru_maxrss in KiB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16", "int8", "fp8"])
    ap.add_argument("--attention", default="sla", choices=["dense", "sla", "sagesla"])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--target", default="sm_120")
    ap.add_argument("--workdir", type=Path, default=Path("engine-build"))
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint, bundle and engine.")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = a.workdir / f"{a.preset}-random-bf16.safetensors"
    if not ckpt.exists():
        _child(["-m", "turbotrt.cli", "random-checkpoint", str(ckpt), "--preset", a.preset], "random checkpoint")
    bundle = a.workdir / f"{a.preset}-{a.precision}-{a.attention}"
    shutil.rmtree(bundle, ignore_errors=True)
    export = ["-m", "turbotrt.cli", "export", str(ckpt), "--out", str(bundle), "--precision", a.precision,
              "--attention", a.attention, "--frames", str(a.frames), "--no-validate"]
    if a.precision in ("int8", "fp8"):
        import numpy as np

        from turbotrt.core.configs import get_config

        cfg = get_config(a.preset)
        emb = a.workdir / "embeddings.npy"
        np.save(emb, np.random.default_rng(0).standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32) * 0.1)
        export += ["--embeddings", str(emb), "--calib-steps", "1", "--no-eval"]
    export_s, export_rss, _ = _child(export, f"export ({a.precision})")
    build_s, build_rss, out = _child(["-c", BUILD, str(bundle), a.target], f"TensorRT for RTX build for {a.target}")
    fields = out.split()
    engine_bytes = int(fields[fields.index("ENGINE_BYTES") + 1])
    row = dict(preset=a.preset, precision=a.precision, attention=a.attention, frames=a.frames, target=a.target,
               build_wall_s=round(build_s, 1), build_peak_rss_gib=round(build_rss / 2**30, 2),
               engine_bytes=engine_bytes, export_wall_s=round(export_s, 1),
               export_peak_rss_gib=round(export_rss / 2**30, 2),
               weights_bytes=sum(f.stat().st_size for f in bundle.glob("dit.onnx*")),
               machine=f"{platform.machine()}, {os.cpu_count()} cores, {_ram_gib():.1f} GiB RAM, no GPU, "
                       f"Python {platform.python_version()}",
               tensorrt_rtx=__import__("tensorrt_rtx").__version__)
    print(f"TensorRT for RTX build of the {a.preset} DiT ({a.precision}, {a.attention}, {a.frames} frames) for "
          f"{a.target} on this machine:")
    print(f"  build wall time   {build_s:8.1f} s")
    print(f"  build peak RSS    {build_rss / 2**30:8.2f} GiB   (weights {row['weights_bytes'] / 2**30:.2f} GiB: "
          f"x{build_rss / max(row['weights_bytes'], 1):.2f})")
    print(f"  engine            {engine_bytes / 2**30:8.2f} GiB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[f"{a.preset}/{a.precision}/{a.attention}/{a.frames}f/{a.target}"] = row
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"  recorded in {RESULTS}")
    if not a.keep:
        shutil.rmtree(bundle, ignore_errors=True)


if __name__ == "__main__":
    main()
