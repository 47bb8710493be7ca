import os
import pickle
from pathlib import Path

import pytest
import torch

# Deterministic, CPU-only, and small enough for a 2-core CI machine; with pytest-xdist's workers
# sharing the cores, one thread each.
torch.manual_seed(0)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

CALIBRATION_PROMPTS = ("a cat walks slowly", "a red bird flies over the river")
_quiet = dict(log=lambda *_: None)

# Every tiny bundle the tests share, made once per session on first use: kind -> how.
#   sagesla/sla/dense   wan-tiny, fp32, validated at export (ONNX Runtime vs PyTorch)
#   i2v                 wan-tiny-i2v (two experts, VAE encode graphs), fp32, sla
#   int8/fp8            the sla bundle calibrated (observer max)
_KINDS = {
    "sagesla": lambda out, get: _export("wan-tiny", out, attention="sagesla"),
    "sla": lambda out, get: _export("wan-tiny", out, attention="sla"),
    "dense": lambda out, get: _export("wan-tiny", out, attention="dense"),
    "i2v": lambda out, get: _export("wan-tiny-i2v", out, attention="sla", validate=False),
    "int8": lambda out, get: _calibrate(get("sla"), out, mode="int8", steps=4),
    "fp8": lambda out, get: _calibrate(get("sla"), out, mode="fp8", steps=2),
}


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """The user cache (verification stamps, ORT optimized graphs) in a temp folder, never the real home."""
    old = os.environ.get("TURBOTRT_CACHE")
    os.environ["TURBOTRT_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("TURBOTRT_CACHE", None)
    else:
        os.environ["TURBOTRT_CACHE"] = old


def _export(source, out, attention, validate=True):
    from turbotrt.export.api import export

    return export(source, out, precision="fp32", attention=attention, validate=validate, **_quiet)


def _calibrate(src, out, mode, steps):
    from turbotrt.calibration.api import calibrate

    return calibrate(src, out, mode=mode, observer="max", prompts=CALIBRATION_PROMPTS, steps=steps, seeds=(0,),
                     **_quiet)


class TinyBundles:
    """`tiny_bundle(kind)` -> the bundle's folder, made on first use; `.result(kind)` what made it
    (an ExportResult, or a QuantReport for int8/fp8). Treat the folders as read-only: copy one
    (`shutil.copytree`) before editing it.

    With pytest-xdist the workers share one folder: the first to need a kind makes it under a file
    lock and pickles its result beside it; the others wait and read it, so each is made once."""

    def __init__(self, root: Path):
        self.root, self.results = root, {}
        root.mkdir(parents=True, exist_ok=True)

    def __call__(self, kind: str):
        if kind not in self.results:
            from filelock import FileLock

            saved = self.root / f"{kind}.result.pickle"
            with FileLock(str(self.root / f"{kind}.lock")):
                if saved.exists():
                    self.results[kind] = pickle.loads(saved.read_bytes())
                else:
                    self.results[kind] = _KINDS[kind](self.root / kind, self)
                    saved.write_bytes(pickle.dumps(self.results[kind]))
        return self.root / kind

    def result(self, kind: str):
        self(kind)
        return self.results[kind]

    report = result


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, worker_id):
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "tiny-bundles"  # xdist: one folder for all workers
    return TinyBundles(root)


@pytest.fixture(scope="session")
def worker_id(request):
    """"master" without pytest-xdist (its own fixture of this name takes over when it is active)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")
