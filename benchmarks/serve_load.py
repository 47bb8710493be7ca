"""Load on `turbotrt serve`: requests/s and p50/p95 latency by concurrent clients and DiT replicas.

Baseline: what `turbotrt run` does per video, in one process (Pipeline, then Result.save to mp4),
in a loop with the graphs already loaded, with ONNX Runtime's intra-op spin-wait on (ORT's default,
TURBOTRT_ORT_SPINNING=1); and the same loop with it off (the runtime's default), which on a small
CPU is most of the difference between one process and Serve's one-stage replicas. Against them:
the same bundle served on a local Ray instance (127.0.0.1), with 1, 2 and 4 clients each sending
POST /v1/videos/sync back to back, first with one DiT (denoiser) replica, then with two.

    python benchmarks/serve_load.py                       # exports the tiny T2V bundle first
    python benchmarks/serve_load.py --bundle DIR --requests 24
Writes benchmarks/results/serve_load.json. Every request is bounded (--timeout) and Ray is shut
down at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT = "a red bird flies over a river at night"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 20 samples, p95 is the second largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(latencies: list[float], wall: float) -> dict:
    return {"requests": len(latencies), "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3)}


def baseline(bundle: Path, requests: int, steps: int, workdir: Path, spinning: bool) -> dict:
    """`spinning=True` runs the loop with ONNX Runtime's intra-op spin-wait on (ORT's default; the
    runtime's is off): one process holds four sessions, and their idle pools' spinning threads take CPU
    from the one running; Serve's replicas each hold one stage's sessions."""
    from turbotrt.runtime.pipeline import Pipeline

    os.environ["TURBOTRT_ORT_SPINNING"] = "1" if spinning else "0"  # the sessions created from here on
    pipe = Pipeline.from_bundle(bundle, backend="ort", log=lambda *_: None)
    pipe(PROMPT, seed=0, steps=steps).save(workdir / "warm-up.mp4")  # loads every graph
    latencies, stages = [], []
    start = time.perf_counter()
    for seed in range(requests):
        t = time.perf_counter()
        result = pipe(PROMPT, seed=seed, steps=steps)
        result.save(workdir / "baseline.mp4")
        latencies.append(time.perf_counter() - t)
        stages.append(result.timings)
    row = summary(latencies, time.perf_counter() - start)
    row["stage_median_s"] = {k: round(statistics.median(t[k] for t in stages), 3) for k in stages[0]}
    return row


def load(url: str, clients: int, requests: int, steps: int, timeout: float) -> dict:
    def one(seed: int) -> float:
        body = json.dumps({"prompt": PROMPT, "seed": seed, "steps": steps}).encode()
        req = urllib.request.Request(f"{url}/v1/videos/sync", data=body, headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if r.status != 200 or r.headers["content-type"] != "video/mp4":
                raise RuntimeError(f"seed {seed}: HTTP {r.status}")
            r.read()
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:  # each client sends its next request when the last one is answered
        latencies = list(pool.map(one, range(requests)))
    return summary(latencies, time.perf_counter() - start)


def machine() -> dict:
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) / 2**20
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    import ray

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "gpu": "none used (ONNX Runtime on CPU)",
            "python": platform.python_version(), "ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="A T2V bundle (default: export wan-tiny, fp32).")
    ap.add_argument("--requests", type=int, default=20, help="Requests per measurement.")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--clients", default="1,2,4", help="Concurrent clients to measure, comma-separated.")
    ap.add_argument("--dit-replicas", default="1,2", help="DiT replicas to measure, comma-separated.")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs the local Ray instance schedules with.")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--timeout", type=float, default=300, help="Seconds one request may take.")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "serve_load.json")
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    replicas = [int(r) for r in a.dit_replicas.split(",")]

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a single node on 127.0.0.1
    import ray

    from turbotrt.serve.app import serve
    from turbotrt.serve.config import ServeConfig, set_stage

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    bundle = a.bundle
    if bundle is None:
        bundle = work / "wan-tiny"
        print(f"exporting wan-tiny (fp32, ONNX only) to {bundle}", flush=True)
        subprocess.run([sys.executable, "-m", "turbotrt.cli", "export", "wan-tiny", "--out", str(bundle),
                        "--precision", "fp32", "--no-validate"], check=True, stdout=subprocess.DEVNULL)
    facts = machine()
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['ram_gib']} GiB, no GPU; load average "
          f"{facts['load_average_at_start']} (others' work on a shared machine slows every figure alike)", flush=True)

    print(f"baseline: Pipeline in a loop (what `turbotrt run` does per video) with ORT's spin-wait on, "
          f"{a.requests} videos", flush=True)
    base = baseline(bundle, a.requests, a.steps, work, spinning=True)
    print(f"  {base['requests_per_s']:.2f} videos/s, p50 {base['p50_s']:.2f} s, p95 {base['p95_s']:.2f} s; "
          f"median stage times {base['stage_median_s']}", flush=True)
    print("the same loop with ONNX Runtime's intra-op spin-wait off (the runtime's default)", flush=True)
    no_spin = baseline(bundle, a.requests, a.steps, work, spinning=False)
    print(f"  {no_spin['requests_per_s']:.2f} videos/s, p50 {no_spin['p50_s']:.2f} s, p95 {no_spin['p95_s']:.2f} s; "
          f"median stage times {no_spin['stage_median_s']}", flush=True)

    rows = []
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        for n in replicas:
            config = ServeConfig(port=a.port, app_name="serve-load", jobs_dir=str(work / f"jobs-{n}"),
                                 queue_size=64, max_results=1000)
            set_stage(config, "denoiser", {"num_replicas": n})
            url = serve(bundle, config, log=lambda m: print(f"  {m}", flush=True), block=False)
            load(url, 1, 2, a.steps, a.timeout)  # warm-up: every replica has run its graphs once
            for c in clients:
                row = {"dit_replicas": n, "clients": c, **load(url, c, a.requests, a.steps, a.timeout)}
                for name, ref in (("baseline", base), ("baseline_no_spin", no_spin)):
                    row[f"requests_per_s_vs_{name}"] = round(row["requests_per_s"] / ref["requests_per_s"], 3)
                    row[f"p50_vs_{name}"] = round(row["p50_s"] / ref["p50_s"], 3)
                rows.append(row)
                print(f"serve, {n} DiT replica{'s' if n > 1 else ''}, {c} client{'s' if c > 1 else ''}: "
                      f"{row['requests_per_s']:.2f} videos/s ({row['requests_per_s_vs_baseline']:.2f}x baseline, "
                      f"{row['requests_per_s_vs_baseline_no_spin']:.2f}x without spin-wait), p50 {row['p50_s']:.2f} s "
                      f"({row['p50_vs_baseline']:.2f}x, {row['p50_vs_baseline_no_spin']:.2f}x), p95 {row['p95_s']:.2f} s",
                      flush=True)
            from ray import serve as ray_serve

            ray_serve.delete(config.app_name)
    finally:
        ray.shutdown()

    facts["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    from turbotrt.core.bundle import Bundle

    bundle_info = Bundle.load(bundle, verify=False)
    result = {
        "command": " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]]),
        "machine": facts,
        "bundle": {"model": bundle_info.model.name, "profile": bundle_info.profile.name,
                   "precision": bundle_info.precision, "steps": a.steps},
        "ray_cpus": a.cpus,
        "baseline": base,
        "baseline_no_spin": no_spin,
        "serve": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"recorded in {a.out}")
    shutil.rmtree(work, ignore_errors=True)  # the exported bundle, jobs and videos


if __name__ == "__main__":
    main()
