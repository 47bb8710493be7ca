"""Prompt following of the trained toy model, per attention setting and precision, in ONNX Runtime.

Each variant is a bundle of the shipped toy model (`turbotrt/toy/weights/`), run end to end by the
torch-free runtime (4 rCM steps) over a fixed grid of toy captions x seeds and scored with
`turbotrt.toy.score` (colour right and motion in the caption's direction). Variants: dense
attention; SLA over a top-k sweep (at the tiny profile's 160 tokens there are 3 key blocks of 64,
so top-k keeps 1, 2 or 3 of them; the kept count is recorded); SageSLA with fp8 and fp16 V; INT8 and
FP8 bundles calibrated from the SLA bundle with each observer (on 16 captions disjoint from the
scored ones). Besides the pass rate, each variant's
mean absolute difference in final latents from the float SLA bundle (same seeds) is recorded.

    python benchmarks/toy_quality.py [--out benchmarks/results/toy_quality.json] [--seeds 0 1]
        [--every 3] [--only dense,sla-0.5,...]

CPU only; one thread; about a minute per variant on the default grid (16 captions x 2 seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

# At the tiny profile's 160 tokens there are 3 key blocks of 64: every topk from 0.05 to 0.66 keeps
# one (upstream's int(topk * 3), at least 1), 0.67 keeps two, 1.0 all three. One value per count.
TOPKS = (0.5, 0.67, 1.0)
RESULTS = Path(__file__).resolve().parent / "results" / "toy_quality.json"
CALIBRATION_SEEDS = (100,)  # held out from the scored seeds


def variants() -> dict[str, dict]:
    """name -> how to make it: export options, or calibration of the float SLA bundle."""
    out = {"dense": dict(attention="dense")}
    out.update({f"sla-{k}": dict(attention="sla", sla_topk=k) for k in TOPKS})
    out["sagesla-fp8"] = dict(attention="sagesla", v_dtype="fp8")
    out["sagesla-fp16"] = dict(attention="sagesla", v_dtype="fp16")
    for mode, observers in (("int8", ("max", "percentile", "entropy", "mse")), ("fp8", ("max", "mse"))):
        out.update({f"{mode}-{o}": dict(calibrate=mode, observer=o) for o in observers})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--every", type=int, default=3, help="score every N-th caption of the 48 (3: 16 captions, "
                   "every colour, shape and direction)")
    p.add_argument("--only", default=None, help="comma-separated variant names")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from turbotrt.calibration.api import calibrate
    from turbotrt.core.sagesla import kept_blocks
    from turbotrt.runtime.pipeline import Pipeline
    from turbotrt.toy.dataset import CAPTIONS
    from turbotrt.toy.model import export_toy
    from turbotrt.toy.score import score_grid

    captions = CAPTIONS[:: args.every]
    calib_captions = [c for c in CAPTIONS[1::3] if c not in captions]
    todo = variants()
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - set(todo)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; available: {', '.join(todo)}")
        todo = {n: todo[n] for n in names}
    quiet = lambda *_: None  # noqa: E731
    results, reference = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sla = tmp / "sla"
        export_toy(sla, precision="fp32", attention="sla", validate=False, log=quiet)
        ref_pipe = Pipeline.from_bundle(sla, backend="ort", log=quiet)
        for c in captions:
            for s in args.seeds:
                reference[c, s] = ref_pipe(c, seed=s, steps=4).latents
        for name, how in todo.items():
            start = time.perf_counter()
            bundle = tmp / name
            entry = {}
            if "calibrate" in how:
                calibrate(sla, bundle, mode=how["calibrate"], observer=how["observer"], prompts=calib_captions, steps=4,
                          seeds=CALIBRATION_SEEDS, evaluate=False, log=quiet)
                entry.update(precision=how["calibrate"], observer=how["observer"], attention="sla")
            else:
                export_toy(bundle, precision="fp32", validate=False, log=quiet, **how)
                entry.update(precision="fp32", **how)
                if "sla_topk" in how:
                    entry["kept_key_blocks"] = f"{kept_blocks(3, how['sla_topk'])} of 3"
            pipe = Pipeline.from_bundle(bundle, backend="ort", log=quiet)
            diffs = []

            def generate(caption, seed):
                video = pipe(caption, seed=seed, steps=4)
                diffs.append(float(np.abs(video.latents - reference[caption, seed]).mean()))
                return video.frames

            grid = score_grid(generate, captions, args.seeds)
            entry.update(pass_rate=grid["pass_rate"], colour_accuracy=grid["colour_accuracy"],
                         direction_accuracy=grid["direction_accuracy"], videos=grid["videos"],
                         latent_mad_vs_sla=float(np.mean(diffs)), seconds=round(time.perf_counter() - start, 1),
                         failed=[f"{r['caption']} (seed {r['seed']})" for r in grid["rows"] if not r["passed"]])
            results[name] = entry
            print(f"{name:16s} pass {entry['pass_rate']:.3f}  colour {entry['colour_accuracy']:.3f}  "
                  f"direction {entry['direction_accuracy']:.3f}  |latent - sla| {entry['latent_mad_vs_sla']:.4f}  "
                  f"({entry['seconds']:.0f} s)", flush=True)
            _write(args, captions, calib_captions, results)  # after each variant: a long run keeps what it has
    print(f"wrote {args.out}")
    return 0


def _write(args, captions, calib_captions, results) -> None:
    record = dict(model="toy (turbotrt/toy/weights, wan-tiny)", captions=list(captions), seeds=args.seeds, steps=4,
                  backend="onnxruntime (CPU)", calibration=dict(prompts=calib_captions, seeds=CALIBRATION_SEEDS),
                  python=platform.python_version(), results=results)
    if args.out.is_file() and args.only:  # a partial run updates the stored table
        old = json.loads(args.out.read_text())
        record["results"] = {**old.get("results", {}), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
