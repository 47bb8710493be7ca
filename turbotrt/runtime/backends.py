"""Backends that run one graph of a bundle: ONNX Runtime (CPU/CUDA) and TensorRT. No torch.

A backend turns a network name into a `Session` whose `run(feeds) -> outputs` takes and gives
numpy arrays by name. Sessions are created lazily, on first use, so a pipeline that never encodes
an image never loads the VAE encoder.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import TurbotrtError

BACKENDS = ("auto", "ort", "trt")


class BackendError(TurbotrtError):
    """A backend that cannot run here (package, GPU, provider or precision missing)."""


class Session(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtSession:
    def __init__(self, path, providers):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:  # ORT raises its own exception types for unreadable or damaged models
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"ONNX Runtime cannot load {path.name}: {first}. The bundle may be damaged or "
                               "truncated: load it with verification on (without --no-verify) to find out") from None
        self.name = path.name
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds):
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}")
        try:
            values = self.sess.run(None, {n: feeds[n] for n in self.inputs})
        except Exception as e:  # ORT's own exception types: a graph that fails on its inputs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"ONNX Runtime failed running {self.name}: {first}. If the bundle was loaded with "
                               "--no-verify, it may be damaged: load it with verification on") from None
        return dict(zip(self.outputs, values))


class OrtBackend:
    """ONNX Runtime: the CUDA provider when present (and asked for), else the CPU provider."""

    name = "ort"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise BackendError(f"ONNX Runtime here has providers {available}, not {unknown}")
        if bundle.manifest.float_precision == "bf16" and "CUDAExecutionProvider" not in providers:
            raise BackendError(
                f"{bundle.root} is a bf16 bundle and ONNX Runtime's CPU provider has no bf16 kernels: run it on an "
                "NVIDIA GPU (onnxruntime-gpu, or TensorRT engines from `turbotrt build`), or export with --precision "
                "fp32 or fp16 to run on a CPU")
        self.bundle, self.providers = bundle, providers
        self._sessions: dict[str, OrtSession] = {}

    def session(self, network: str) -> OrtSession:
        if network not in self._sessions:
            self._sessions[network] = OrtSession(self.bundle.checked_graph(network), self.providers)
        return self._sessions[network]

    def describe(self) -> str:
        return f"ONNX Runtime ({', '.join(self.providers)})"


class TrtBackend:
    """TensorRT engines through Polygraphy's runner (device buffers, execute_async_v3).

    Needs `tensorrt`, `polygraphy` and a GPU; engines must match this GPU and TensorRT version
    (the bundle refuses others with the command that rebuilds them). The SageSLA plugin's kernel is
    compiled ahead of time into the engine, so nothing needs registering here (TensorRT's Python
    plugin documentation: AOT plugins make engines independent of Python and the plugin source).
    """

    name = "trt"

    def __init__(self, bundle: Bundle):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendError(f"the TensorRT backend needs the `tensorrt` package ({e}); use --backend ort") from None
        from turbotrt.core.gpu import compute_capability

        cc = compute_capability()
        if cc is None:
            raise BackendError("the TensorRT backend needs an NVIDIA GPU; none was found (use --backend ort)")
        self.bundle, self.cc, self.trt_version = bundle, cc, trt.__version__
        self._sessions = {}

    def session(self, network: str):
        if network not in self._sessions:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            plan = self.bundle.engine(network, "tensorrt", self.cc, self.trt_version)
            runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan))))
            runner.activate()
            self._sessions[network] = _TrtSession(runner)
        return self._sessions[network]

    def describe(self) -> str:
        return f"TensorRT {self.trt_version} on {self.cc}"


class _TrtSession:
    def __init__(self, runner):
        self.runner = runner

    def run(self, feeds):
        return {k: np.asarray(v) for k, v in self.runner.infer(feed_dict=dict(feeds)).items()}


def make_backend(bundle: Bundle, name: str = "auto", log=print):
    """`auto` takes TensorRT when it is installed and the bundle has engines for this GPU, else ONNX
    Runtime, and says which (and why) rather than falling back silently."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "ort":
        return OrtBackend(bundle)
    if name == "trt":
        return TrtBackend(bundle)
    try:
        backend = TrtBackend(bundle)
        for network in bundle.networks:
            bundle.engine(network, "tensorrt", backend.cc, backend.trt_version)
        log(f"backend: {backend.describe()}")
        return backend
    except TurbotrtError as e:
        backend = OrtBackend(bundle)
        log(f"backend: {backend.describe()} (TensorRT not used: {e})")
        return backend
