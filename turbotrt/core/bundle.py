"""A bundle: the folder `turbotrt export` writes and `turbotrt run` reads. Torch-free.

    manifest.json          typed in `turbotrt.core.manifest`: model, profile, attention, precision,
                           sampler, per-graph I/O specs, engines, the sha256 of every other file,
                           and its own digest
    dit.onnx (+ .data)     one per DiT expert (dit_high, dit_low for I2V A14B)
    text_encoder.onnx      umT5
    vae_decode_first.onnx, vae_decode_step.onnx (+ vae_encode_* for I2V)
    tokenizer/             the sentencepiece model
    engines/<flavour>/<sm_XX>/   TensorRT / TensorRT-for-RTX plans (`turbotrt build`)

`Bundle.load` is the only way in: it parses and bounds the manifest, confines every path to the
folder (no symlinks, no `..`), checks that every listed file is present and (unless told not to)
unchanged, and for engines that they fit this GPU and library, with a message that says what to
do when they do not. `BundleWriter` is the only way out: it owns the partial folder, hashes what
was written and commits the folder whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from turbotrt.core.configs import AttentionConfig, ShapeProfile, WanConfig
from turbotrt.core.errors import BundleError
from turbotrt.core.files import (
    StagingDir,
    UnsafePathError,
    check_identifier,
    has_symlink,
    inside,
    sha256_file,
    write_atomic,
)
from turbotrt.core.manifest import MANIFEST, EngineEntry, GraphEntry, GraphSpec, Manifest, Quantization, Sampler
from turbotrt.core.stamps import changed_files

__all__ = ["Bundle", "BundleWriter", "BundleError", "MANIFEST", "is_bundle"]


def is_bundle(path: str | os.PathLike) -> bool:
    """A folder with a manifest (what `--force` may replace)."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / MANIFEST).is_file()


def _unsafe(e: UnsafePathError, root: Path) -> BundleError:
    return BundleError(f"{root}: {e}; the bundle was edited by hand or is not from turbotrt")


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    verified: bool = False  # every file's sha256 checked by `load` (or stamped as unchanged since)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Read and check a bundle. verify: also check every file's sha256 (and the manifest's own digest);
        files hashed by an earlier load and unchanged since (`turbotrt.core.stamps`) are not hashed again."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root} is not a folder (a bundle is the folder `turbotrt export --out` wrote)")
        mf = root / MANIFEST
        if mf.is_symlink():
            raise BundleError(f"{mf} is a symlink; bundles hold no symlinks")
        if not mf.is_file():
            partial = root.with_name(root.name + ".partial")
            hint = " (an export into it was interrupted: export again)" if partial.exists() else ""
            raise BundleError(f"{root} is not a turbotrt bundle: no {MANIFEST}{hint}")
        try:
            raw = mf.read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read {mf}: {e.strerror}") from None
        manifest = Manifest.from_json(raw, verify_digest=verify, where=str(mf))
        bundle = cls(root, manifest)
        bundle.check_files(hashes=verify)
        bundle.verified = verify
        return bundle

    # --- paths --------------------------------------------------------------------------------------
    def path(self, rel: str, what: str = "file") -> Path:
        """root/rel, confined to the bundle (no absolute paths, `..` or symlinks)."""
        try:
            return inside(self.root, rel, what)
        except UnsafePathError as e:
            raise _unsafe(e, self.root) from None

    def check_files(self, hashes: bool = True) -> None:
        files = self.manifest.files
        if not files:
            raise BundleError(f"{self.root}: the manifest lists no files; export the bundle again")
        link = has_symlink(self.root)
        if link is not None:
            raise BundleError(f"{self.root}: {link.relative_to(self.root)} is a symlink; bundles hold no symlinks "
                              "(copy the file in instead)")
        missing = [f for f in files if not self.path(f).is_file()]
        if missing:
            raise BundleError(f"{self.root}: missing {', '.join(missing)}; the bundle is incomplete, export it again")
        if hashes:
            # hashed once; later loads compare each file's stat with the stamp kept in the user cache
            manifest_sha256 = hashlib.sha256(self.path(MANIFEST).read_bytes()).hexdigest()
            changed = changed_files(self.root, files, self.path, manifest_sha256)
            if changed:
                raise BundleError(f"{self.root}: {', '.join(changed)} changed since export (sha256 mismatch); "
                                  f"export the bundle again, or rebuild engines with `turbotrt build`")

    # --- what is inside -------------------------------------------------------------------------------
    @property
    def model(self) -> WanConfig:
        return self.manifest.model

    @property
    def profile(self) -> ShapeProfile:
        return self.manifest.profile

    @property
    def attention(self) -> AttentionConfig:
        return self.manifest.attention

    @property
    def sampler(self) -> Sampler:
        return self.manifest.sampler

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def networks(self) -> list[str]:
        return list(self.manifest.graphs)

    def _entry(self, network: str) -> GraphEntry:
        try:
            return self.manifest.graphs[network]
        except KeyError:
            raise BundleError(f"{self.root} has no {network} graph (it has {', '.join(self.networks)}); "
                              f"export it with that network's checkpoint") from None

    def graph(self, network: str) -> Path:
        return self.path(self._entry(network).file, f"graphs.{network}.file")

    def checked_graph(self, network: str) -> Path:
        """The graph's path after checking that its external data stays in its own data file (what a
        reader calls before handing the file to ONNX Runtime or TensorRT)."""
        from turbotrt.core.onnx_refs import check_external_data

        path = self.graph(network)
        data = self.data(network)
        check_external_data(path, data.name if data else None)
        return path

    def data(self, network: str) -> Path | None:
        entry = self._entry(network)
        return None if entry.data is None else self.path(entry.data, f"graphs.{network}.data")

    def spec(self, network: str) -> GraphSpec:
        return self._entry(network).spec

    @property
    def tokenizer(self) -> Path:
        rel = self.manifest.tokenizer
        if not rel:
            raise BundleError(f"{self.root} has no tokenizer; export with --tokenizer spiece.model")
        return self.path(rel, "tokenizer")

    # --- engines --------------------------------------------------------------------------------------
    def engine(self, network: str, flavour: str, target: str, library_version: str) -> Path:
        """The plan of `flavour` for this GPU and library, or a BundleError that says how to get one."""
        entries = [e for e in self.manifest.engines.get(network, []) if e.flavour == flavour]
        runtime = "" if flavour == "tensorrt" else f" --runtime {flavour}"
        rebuild = f"run `turbotrt build {self.root}{runtime} --target {target}` on this machine"
        if not entries:
            raise BundleError(f"{self.root}: no {flavour} engine for {network}; {rebuild}")
        for e in entries:
            if _gpu_fits(e, target) and _library_fits(e, library_version):
                return self.path(e.file, f"engines.{network}")
        built = ", ".join(f"{e.target} / {flavour} {e.library_version}" for e in entries)
        raise BundleError(f"{self.root}: the {network} engine was built for {built}, but this machine has "
                          f"{target} / {flavour} {library_version}; {rebuild}")

    def update(self, change: Callable[[Manifest], None]) -> None:
        """Apply `change` to the manifest as it is on disk now (re-read, so concurrent builds keep each
        other's entries) and write it back atomically."""
        mf = self.path(MANIFEST)
        current = Manifest.from_json(mf.read_bytes(), verify_digest=True, where=str(mf))
        change(current)
        write_atomic(mf, current.to_json())
        self.manifest = current

    def record_engine(self, network: str, entry: EngineEntry, data: bytes | memoryview) -> Path:
        """Write an engine file (atomically) and its manifest entry, replacing one for the same file."""
        path = self.path(entry.file, "engine")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

        def change(m: Manifest):
            m.engines[network] = [e for e in m.engines.get(network, []) if e.file != entry.file] + [entry]
            m.files[entry.file] = entry.sha256

        self.update(change)
        return path

def forget_missing_engines(path: str | os.PathLike) -> list[str]:
    """Drop manifest entries of engine files that were deleted, so the bundle loads and can be rebuilt.

    Reads the manifest as `Bundle.load` does (digest, paths, bounds) but tolerates the missing engines."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file() or mf.is_symlink():
        return []  # Bundle.load says what is wrong
    manifest = Manifest.from_json(mf.read_bytes(), where=str(mf))
    bundle = Bundle(root, manifest)
    gone = sorted({e.file for entries in manifest.engines.values() for e in entries
                   if not bundle.path(e.file).is_file()})
    if gone:
        def change(m: Manifest):
            m.engines = {n: [e for e in es if e.file not in gone] for n, es in m.engines.items()}
            m.engines = {n: es for n, es in m.engines.items() if es}
            for f in gone:
                m.files.pop(f, None)

        bundle.update(change)
    return gone


def _sm(cc: str) -> int:
    return int(cc.removeprefix("sm_").rstrip("a"))


def _gpu_fits(entry: EngineEntry, target: str) -> bool:
    """Same compute capability, or a hardware-compatible (ampere_plus) engine on sm_80 or newer."""
    if entry.target == target:
        return True
    return entry.hardware_compatibility == "ampere_plus" and _sm(target) >= 80


def _version(v: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in v.split(".")[:3])
    except ValueError:
        return None


def _library_fits(entry: EngineEntry, version: str) -> bool:
    """The same library release (major.minor.patch: the build number may be spelled or not), or a
    version-compatible engine under a newer library of the same major version."""
    built, now = _version(entry.library_version), _version(version)
    if built is None or now is None:
        return entry.library_version == version
    if built == now:
        return True
    return entry.version_compatible and now[0] == built[0] and now >= built


# --- writing ------------------------------------------------------------------------------------------

class BundleWriter:
    """Build a bundle in `<out>.partial` and commit it whole.

        with BundleWriter(out, force=force) as w:
            path = w.file("dit.onnx")            # write the graph (and dit.onnx.data) there
            w.add_graph(spec, "dit.onnx")
            ...
            bundle = w.commit(model=..., profile=..., attention=..., precision=...)

    Refusals (an existing folder without --force, a non-bundle with --force, an unwritable parent)
    come at `__enter__`, before any work; leaving the block without `commit` removes the partial
    folder.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False, log: Callable[[str], None] = print):
        self.stage = StagingDir(out, force=force, is_replaceable=is_bundle, what="bundle", log=log)
        self.out = self.stage.out
        self.graphs: dict[str, GraphEntry] = {}
        self.tokenizer: str | None = None

    def __enter__(self) -> "BundleWriter":
        self.stage.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stage.__exit__(*exc)

    @property
    def root(self) -> Path:
        return self.stage.path

    def file(self, rel: str) -> Path:
        """Where to write `rel` inside the partial bundle (folders made as needed)."""
        path = inside(self.root, rel, "bundle file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add_graph(self, spec: GraphSpec, file: str) -> GraphEntry:
        check_identifier(spec.network, "network")
        data = file + ".data"
        entry = GraphEntry(file, data if self.file(data).is_file() else None, spec)
        self.graphs[spec.network] = entry
        return entry

    def copy_in(self, src: str | os.PathLike, rel: str) -> Path:
        """Copy a file's bytes in (never a link: a hard link would share the inode with the source)."""
        dst = self.file(rel)
        shutil.copyfile(src, dst, follow_symlinks=True)
        return dst

    def write_json(self, rel: str, obj) -> Path:
        return write_atomic(self.file(rel), json.dumps(obj, indent=2) + "\n")

    def commit(self, model: WanConfig, profile: ShapeProfile, attention: AttentionConfig, precision: str,
               quantization: Quantization | None = None, validation: list[dict] | None = None,
               lint: dict | None = None, engines: dict | None = None) -> Bundle:
        """Hash every file, write the manifest, and put the folder in place."""
        files = {}
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if p.is_symlink():
                raise BundleError(f"{rel} is a symlink; bundles hold no symlinks")
            if p.is_file() and rel not in (MANIFEST, ".turbotrt-owner"):
                files[rel] = sha256_file(p)
        manifest = Manifest(model=model, profile=profile, attention=attention, precision=precision,
                            sampler=Sampler.for_model(model), graphs=dict(self.graphs), tokenizer=self.tokenizer,
                            quantization=quantization, engines=dict(engines or {}), files=files,
                            validation=list(validation or []), lint=dict(lint or {}))
        raw = manifest.to_json()
        Manifest.from_json(raw)  # what we write must read back: the same checks as any reader's
        write_atomic(self.root / MANIFEST, raw)
        out = self.stage.commit()
        return Bundle(out, manifest)


__all__ += ["forget_missing_engines"]
