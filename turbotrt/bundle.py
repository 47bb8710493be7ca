"""A bundle: the folder `turbotrt export` writes and `turbotrt run` reads. numpy-free, torch-free.

    manifest.json          schema version, model/sampler/attention config, shape profile, per-graph
                           I/O specs, engines, and the sha256 of every other file
    dit.onnx (+ .data)     one per DiT expert (dit_high, dit_low for I2V A14B)
    text_encoder.onnx      umT5
    vae_decode_first.onnx, vae_decode_step.onnx (+ vae_encode_* for I2V)
    tokenizer/             the sentencepiece model
    engines/<sm_XX>/       TensorRT plans, when built (`turbotrt build`)

Loading checks the schema version, that every listed file is present and unchanged, and (for
engines) that they were built for this GPU and TensorRT version, with a message that says what to
do when they were not.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class BundleError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest, by relative path."""
    return {f.relative_to(folder).as_posix(): sha256_file(f)
            for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)}


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write manifest.json atomically (temp file, then rename)."""
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        root = Path(path)
        mf = root / MANIFEST
        if not mf.is_file():
            partial = root.with_name(root.name + ".partial")
            hint = " (an export into it was interrupted: export again)" if partial.exists() else ""
            raise BundleError(f"{root} is not a turbotrt bundle: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{mf} is not valid JSON ({e}); export the bundle again") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{root}: bundle schema version {version!r}, this turbotrt reads version "
                              f"{SCHEMA_VERSION}; export it again with this version (or install the turbotrt "
                              f"that wrote it)")
        bundle = cls(root, manifest)
        bundle.check_files(hashes=verify)
        return bundle

    def check_files(self, hashes: bool = True) -> None:
        files = self.manifest.get("files") or {}
        if not files:
            raise BundleError(f"{self.root}: the manifest lists no files; export the bundle again")
        missing = [f for f in files if not (self.root / f).is_file()]
        if missing:
            raise BundleError(f"{self.root}: missing {', '.join(missing)}; the bundle is incomplete, export it again")
        if hashes:
            changed = [f for f, digest in files.items() if sha256_file(self.root / f) != digest]
            if changed:
                raise BundleError(f"{self.root}: {', '.join(changed)} changed since export (sha256 mismatch); "
                                  f"export the bundle again, or rebuild engines with `turbotrt build`")

    # --- what is inside ---------------------------------------------------------------------------
    @property
    def networks(self) -> list[str]:
        return list(self.manifest["graphs"])

    def graph(self, network: str) -> Path:
        try:
            return self.root / self.manifest["graphs"][network]["file"]
        except KeyError:
            raise BundleError(f"{self.root} has no {network} graph (it has {', '.join(self.networks)}); "
                              f"export it with that network's checkpoint") from None

    def spec(self, network: str) -> dict:
        self.graph(network)
        return self.manifest["graphs"][network]["spec"]

    @property
    def tokenizer(self) -> Path:
        rel = self.manifest.get("tokenizer")
        if not rel:
            raise BundleError(f"{self.root} has no tokenizer; export with --tokenizer spiece.model")
        return self.root / rel

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def profile(self) -> dict:
        return self.manifest["profile"]

    @property
    def sampler(self) -> dict:
        return self.manifest["sampler"]

    # --- engines ----------------------------------------------------------------------------------
    def engine(self, network: str, compute_capability: str, tensorrt_version: str) -> Path:
        """The plan for this GPU and TensorRT, or a BundleError that says how to get one."""
        entries = self.manifest.get("engines", {}).get(network, [])
        rebuild = f"run `turbotrt build {self.root} --target {compute_capability}` on this machine"
        if not entries:
            raise BundleError(f"{self.root}: no TensorRT engine for {network}; {rebuild}")
        for e in entries:
            if _gpu_fits(e, compute_capability) and _trt_fits(e, tensorrt_version):
                return self.root / e["file"]
        built = ", ".join(f"{e['compute_capability']} / TensorRT {e['tensorrt_version']}" for e in entries)
        raise BundleError(f"{self.root}: the {network} engine was built for {built}, but this machine has "
                          f"{compute_capability} / TensorRT {tensorrt_version}; {rebuild}")


def _sm(cc: str) -> int:
    return int(cc.removeprefix("sm_").rstrip("a"))


def _gpu_fits(entry: dict, cc: str) -> bool:
    """Same compute capability, or a hardware-compatible (ampere_plus) engine on sm_80 or newer."""
    if entry["compute_capability"] == cc:
        return True
    return entry.get("hardware_compatibility") == "ampere_plus" and _sm(cc) >= 80


def _trt_fits(entry: dict, version: str) -> bool:
    """Same TensorRT, or a version-compatible engine under a newer TensorRT of the same major version."""
    if entry["tensorrt_version"] == version:
        return True
    built, now = (tuple(int(x) for x in v.split(".")[:3]) for v in (entry["tensorrt_version"], version))
    return bool(entry.get("version_compatible")) and now[0] == built[0] and now >= built
