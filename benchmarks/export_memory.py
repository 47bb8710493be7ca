"""Peak memory and wall time of exporting a full-size DiT from a (random) bf16 checkpoint.

Compares the export's peak RSS with the checkpoint's size: the export traces on `meta` and streams
weights one tensor at a time, so the peak should stay near a fixed floor whatever the model size
(target: <= 3 GiB, on a 24 GiB machine that cannot hold a 14B checkpoint twice).

    python benchmarks/export_memory.py --preset wan2.1-t2v-1.3b --workdir /path/with/space
Not a test: it writes a checkpoint of the model's full size (2.6 GB for 1.3B, 28 GB for 14B).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

EXPORT = """
import sys, time, resource
from turbotrt.export.api import export
t = time.perf_counter()
export(sys.argv[1], sys.argv[2], precision=sys.argv[3], attention=sys.argv[4], validate=False, force=True,
       log=lambda m: print(m, flush=True))
print("EXPORT_SECONDS", time.perf_counter() - t)
"""


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--workdir", type=Path, default=Path("export-memory"))
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--attention", default="sagesla")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and the export.")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "export_memory.json")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = a.workdir / f"{a.preset}-random-bf16.safetensors"
    t0 = time.perf_counter()
    existed = ckpt.exists()
    if not existed:
        subprocess.run([sys.executable, "-m", "turbotrt.cli", "random-checkpoint", str(ckpt), "--preset", a.preset],
                       check=True)
    gen_s = time.perf_counter() - t0 if not existed else None  # a reused checkpoint was not timed
    out = a.workdir / f"{a.preset}-onnx"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", EXPORT, str(ckpt), str(out), a.precision, a.attention],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"export failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB; the largest child
    ckpt_bytes = ckpt.stat().st_size
    onnx_bytes = sum(f.stat().st_size for f in out.iterdir())
    row = dict(preset=a.preset, precision=a.precision, attention=a.attention, checkpoint_bytes=ckpt_bytes,
               onnx_bytes=onnx_bytes, export_wall_s=round(wall, 1), peak_rss_bytes=peak,
               peak_rss_over_checkpoint=round(peak / ckpt_bytes, 3), checkpoint_generation_s=gen_s and round(gen_s, 1),
               machine=f"{platform.machine()}, {os.cpu_count()} cores, {_ram_gib():.1f} GiB RAM, "
                       f"Python {platform.python_version()}")
    print(f"export of {a.preset} ({a.precision}, {a.attention}) from a {ckpt_bytes / 1e9:.2f} GB bf16 checkpoint:")
    print(f"  wall time        {wall:8.1f} s")
    print(f"  peak RSS         {peak / 2**30:8.2f} GiB")
    print(f"  peak RSS / ckpt  {peak / ckpt_bytes:8.3f}   (target: peak <= 3 GiB whatever the size)")
    print(f"  ONNX + data      {onnx_bytes / 1e9:8.2f} GB")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    results[f"{a.preset}/{a.precision}/{a.attention}"] = row
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"  recorded in {a.out}")
    if not a.keep:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        ckpt.unlink()


if __name__ == "__main__":
    main()
