"""ONNX Runtime's optimized models, kept in the user cache so that only the first process optimizes a graph.
No torch.

At real size most of a session's creation is graph optimization (86-106 s for the 1.3B 480p DiT; its
saved optimized model loads in 17-24 s). The first session of a graph saves ORT's optimized model
(`SessionOptions.optimized_model_filepath`, weights in an external data file so graphs over 2 GB fit);
later sessions load that with graph optimizations off. One entry per

    graph sha256 and data sha256 (from the verified manifest), ORT version, providers, optimization
    level, and CPU (an optimized model may use layouts and kernels of the CPU it was made on)

in `<cache>/ort-optimized/<key>/`, written in a temp folder beside it and renamed whole, so a reader
sees a complete entry or none. Only a verified bundle's graphs are saved: an entry is what a graph with
that sha256 optimizes to. An entry that fails to load or has the wrong size is discarded and rebuilt,
with one line said; one that cannot be written costs a warning and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
from pathlib import Path

from turbotrt.core.bundle import Bundle
from turbotrt.core.cache import cache_dir, warn_once
from turbotrt.core.files import write_atomic

MODEL, DATA, META = "model.onnx", "model.onnx.data", "meta.json"


def _cpu() -> str:
    """The CPU's architecture and feature flags (Linux), which decide the kernels ORT's optimizer picks."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


class OrtModelCache:
    def __init__(self, folder: Path, network: str, providers: list[str], save: bool, log=print):
        self.folder, self.network, self.providers, self.save, self.log = folder, network, providers, save, log

    @classmethod
    def for_graph(cls, bundle: Bundle, network: str, providers: list[str], opts, log=print) -> "OrtModelCache":
        import onnxruntime as ort

        entry = bundle.manifest.graphs[network]
        files = bundle.manifest.files
        key = json.dumps([files.get(entry.file), files.get(entry.data or ""), ort.__version__, list(providers),
                          int(opts.graph_optimization_level), _cpu()])
        folder = cache_dir("ort-optimized", hashlib.sha256(key.encode()).hexdigest()[:32])
        return cls(folder, network, list(providers), save=bundle.verified and files.get(entry.file) is not None,
                   log=log)

    def load(self):
        """A session from the saved optimized model, or None (none saved, or a damaged one, now removed)."""
        import onnxruntime as ort

        from turbotrt.runtime.backends import session_options

        model = self.folder / MODEL
        if not model.is_file():
            if self.folder.exists():  # half-deleted by hand: clear the way for a new entry
                shutil.rmtree(self.folder, ignore_errors=True)
            return None
        try:
            sizes = json.loads((self.folder / META).read_bytes())["sizes"]
            for name, size in sizes.items():
                if name not in (MODEL, DATA) or (self.folder / name).stat().st_size != size:
                    raise ValueError(f"{name} is not the size it was saved with")
            opts = session_options()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # it was optimized once
            return ort.InferenceSession(str(model), opts, providers=self.providers)
        except Exception as e:  # OSError, bad JSON, wrong sizes, or ORT's own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.log(f"discarding the cached optimized {self.network} graph ({first[:200]}); optimizing it again")
            shutil.rmtree(self.folder, ignore_errors=True)
            return None

    def saving(self) -> "_Saving | None":
        """Where the session being created saves its optimized model, or None (not saved)."""
        if not self.save:
            return None
        tmp = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            _unwritable(self.folder.parent, e)
            return None
        return _Saving(tmp, self.folder)


class _Saving:
    def __init__(self, tmp: Path, folder: Path):
        self.tmp, self.folder = tmp, folder

    def configure(self, opts) -> None:
        opts.optimized_model_filepath = str(self.tmp / MODEL)
        # weights beside the model (a model proto holds at most 2 GB), found by a name relative to it
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")

    def commit(self) -> None:
        try:
            sizes = {p.name: p.stat().st_size for p in self.tmp.iterdir() if p.name in (MODEL, DATA)}
            if MODEL not in sizes:
                raise OSError(f"ONNX Runtime wrote no {MODEL}")
            write_atomic(self.tmp / META, json.dumps({"sizes": sizes}))
            os.rename(self.tmp, self.folder)
        except OSError as e:
            if not (self.folder / MODEL).is_file():  # not just another process that saved it first
                _unwritable(self.folder.parent, e)
            self.abandon()

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def failed(self, why: str) -> None:
        """The session could be created only without saving its optimized model."""
        _unwritable(self.folder.parent, OSError(f"ONNX Runtime could not save it: {why[:200]}"))


def _unwritable(where: Path, e: OSError) -> None:
    warn_once("ort-cache", f"cannot keep optimized ONNX Runtime graphs in {where} ({e.strerror or e}); sessions are "
                           "optimized from scratch in every process (set TURBOTRT_CACHE to a writable folder)")
