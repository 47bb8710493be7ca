"""Backends that run one graph of a bundle: ONNX Runtime (CPU/CUDA) and TensorRT. No torch.

A backend turns a network name into a `Session` whose `run(feeds) -> outputs` takes and gives
numpy arrays by name. Sessions are created on first use (`session(network)`, safe from several threads:
the pipeline starts ONNX Runtime's all at once while it encodes the prompt).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import TurbotrtError

BACKENDS = ("auto", "ort", "trt", "rtx")


class BackendError(TurbotrtError):
    """A backend that cannot run here (package, GPU, provider or precision missing)."""


class Session(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtSession:
    """One ONNX Runtime session: from the bundle's graph, or from ORT's optimized copy of it kept in the
    user cache (`OrtModelCache`), which skips graph optimization (most of session creation at real size)."""

    def __init__(self, path: Path, providers, cache: "OrtModelCache | None" = None):
        self.name = path.name
        self.sess = cache.load() if cache is not None else None
        if self.sess is None:
            self.sess = self._create(path, providers, cache)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    @staticmethod
    def _create(path, providers, cache):
        import onnxruntime as ort

        saving = cache.saving() if cache is not None else None
        opts = session_options()
        if saving is not None:
            saving.configure(opts)
        try:
            sess = ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as e:  # ORT raises its own exception types for unreadable or damaged models
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if saving is not None:
                # only verified graphs are saved, so the save is the likelier cause (a full disk, a quota):
                # a cache must never stop a session, so try once more without it
                saving.abandon()
                sess = OrtSession._create(path, providers, None)
                saving.failed(first)
                return sess
            raise BackendError(f"ONNX Runtime cannot load {path.name}: {first}. The bundle may be damaged or "
                               "truncated: load it with verification on (without --no-verify) to find out") from None
        if saving is not None:
            saving.commit()
        return sess

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


def session_options():
    """The options of every ORT session: ORT's defaults (the fastest measured here), quiet, and intra-op
    threads that sleep rather than spin between kernels unless TURBOTRT_ORT_SPINNING=1: spinning threads
    take the cores they wait on, which made the tiny pipeline 2x slower on 2 shared cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning() else "0")
    return opts


def spinning() -> bool:
    """TURBOTRT_ORT_SPINNING=1 brings back ORT's default of intra-op threads spinning while they wait
    for work (worth trying on a dedicated machine with many cores)."""
    value = os.environ.get("TURBOTRT_ORT_SPINNING", "0")
    if value not in ("0", "1"):
        raise BackendError(f"TURBOTRT_ORT_SPINNING={value!r}: set it to 1 (spin) or 0 (sleep, the default)")
    return value == "1"


class _Sessions:
    """Sessions by network, each created once even when asked for from several threads at the same time
    (the pipeline starts them all concurrently). A TurbotrtError (a damaged graph, a missing provider) is
    kept and raised to every caller, so a failure in a background thread is not paid for twice; anything
    else (Ctrl-C, out of memory) lets the next caller try again."""

    def _init_sessions(self):
        self._lock = threading.Lock()
        self._sessions: dict[str, Future] = {}

    def session(self, network: str):
        with self._lock:
            future = self._sessions.get(network)
            mine = future is None
            if mine:
                future = self._sessions[network] = Future()
        if mine:
            try:
                future.set_result(self._create_session(network))
            except BaseException as e:
                if not isinstance(e, TurbotrtError):
                    with self._lock:
                        del self._sessions[network]
                future.set_exception(e)
                raise
        return future.result()


class OrtBackend(_Sessions):
    """ONNX Runtime: the CUDA provider when present (and asked for), else the CPU provider.

    cache: keep each graph's optimized model in the user cache and start later sessions from it."""

    name = "ort"
    concurrent_start = True  # sessions may be created from several threads at once

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, cache: bool = True, log=print):
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
        self.bundle, self.providers, self.cache, self.log = bundle, providers, cache, log
        self._init_sessions()

    def _create_session(self, network: str) -> OrtSession:
        from turbotrt.runtime.ort_cache import OrtModelCache

        path = self.bundle.checked_graph(network)
        cache = OrtModelCache.for_graph(self.bundle, network, self.providers, session_options(), self.log) \
            if self.cache else None
        return OrtSession(path, self.providers, cache)

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


class RtxBackend:
    """TensorRT for RTX engines (`engines/tensorrt-rtx/<sm>/`), through `tensorrt_rtx`'s runtime.

    Needs `tensorrt_rtx`, an RTX-class NVIDIA GPU and the CUDA runtime library (device buffers go
    through Polygraphy's CUDA wrapper). The engine's portable program is compiled for this GPU when
    it loads; that compilation is kept in a runtime cache in the user cache folder, one file per
    engine, so the next process starts fast. Unverified: no GPU on the machines this is built on.
    """

    name = "rtx"

    def __init__(self, bundle: Bundle):
        try:
            import tensorrt_rtx as trt
        except ImportError as e:
            raise BackendError(f"the TensorRT for RTX backend needs the `tensorrt_rtx` package ({e}): "
                               "pip install 'turbotrt[rtx]'; or use --backend ort") from None
        from turbotrt.core.gpu import compute_capability

        cc = compute_capability()
        if cc is None:
            raise BackendError("the TensorRT for RTX backend needs an NVIDIA GPU; none was found (use --backend ort)")
        self.trt, self.bundle, self.cc, self.version = trt, bundle, cc, trt.__version__
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._sessions = {}

    def session(self, network: str):
        if network not in self._sessions:
            plan = self.bundle.engine(network, "tensorrt-rtx", self.cc, self.version)
            engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT for RTX could not load {plan.name} on {self.cc} (see its log above)")
            self._sessions[network] = _RtxSession(self.trt, engine, runtime_cache_path(plan))
        return self._sessions[network]

    def describe(self) -> str:
        return f"TensorRT for RTX {self.version} on {self.cc}"


def runtime_cache_path(plan) -> Path:
    """The runtime cache of one engine: in the user cache folder (never in the bundle, which is an
    input), named by the engine's sha256 so a rebuilt engine never meets a stale cache."""
    import hashlib

    from turbotrt.core.cache import cache_dir

    digest = hashlib.sha256(Path(plan).read_bytes()).hexdigest()[:32]
    return cache_dir("rtx-runtime-cache", f"{digest}.cache")


class _RtxSession:
    def __init__(self, trt, engine, cache_path):
        try:
            from polygraphy import cuda
        except ImportError as e:
            raise BackendError(f"the TensorRT for RTX backend moves data with Polygraphy's CUDA wrapper ({e}): "
                               "pip install 'turbotrt[rtx]'") from None
        self.cuda, self.trt, self.engine, self.cache_path = cuda, trt, engine, cache_path
        config = engine.create_runtime_config()
        self.cache = config.create_runtime_cache()
        if cache_path.is_file():
            self.cache.deserialize(cache_path.read_bytes())
        config.set_runtime_cache(self.cache)
        self.context = engine.create_execution_context(config)
        self.stream = cuda.Stream()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.buffers = {}

    def run(self, feeds):
        out = {}
        for name in self.names:
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self.buffers.get(name)
            if buf is None:
                buf = self.buffers[name] = self.cuda.DeviceArray(shape=shape, dtype=dtype)
            if name in self.outputs:
                out[name] = np.empty(shape, dtype)
            else:
                buf.copy_from(np.ascontiguousarray(feeds[name], dtype=dtype), self.stream)
            self.context.set_tensor_address(name, buf.ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise BackendError("TensorRT for RTX failed to run the engine (see its log above)")
        for name, host in out.items():
            self.buffers[name].copy_to(host, self.stream)
        self.stream.synchronize()
        self._save_cache()
        return out

    def _save_cache(self):
        from turbotrt.core.files import write_atomic

        raw = bytes(memoryview(self.cache.serialize()))
        if raw and (not self.cache_path.is_file() or self.cache_path.stat().st_size != len(raw)):
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.cache_path, raw)


def make_backend(bundle: Bundle, name: str = "auto", log=print):
    """`auto` takes TensorRT engines for this GPU, then TensorRT for RTX engines, else ONNX Runtime,
    and says which (and why not the others) rather than falling back silently."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "ort":
        return OrtBackend(bundle, log=log)
    if name == "trt":
        return TrtBackend(bundle)
    if name == "rtx":
        return RtxBackend(bundle)
    why = []
    for kind, flavour in ((TrtBackend, "tensorrt"), (RtxBackend, "tensorrt-rtx")):
        try:
            backend = kind(bundle)
            for network in bundle.networks:
                bundle.engine(network, flavour, backend.cc, getattr(backend, "trt_version", None) or backend.version)
            log(f"backend: {backend.describe()}")
            return backend
        except TurbotrtError as e:
            why.append(f"{flavour}: {e}")
    backend = OrtBackend(bundle, log=log)
    log(f"backend: {backend.describe()} (engines not used: {'; '.join(why)})")
    return backend
