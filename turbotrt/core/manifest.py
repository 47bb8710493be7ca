"""`manifest.json`, typed: what a bundle holds, written and parsed only here. Torch-free.

A manifest is untrusted input when read (a bundle may come from anywhere, or be edited by hand),
so `Manifest.from_json` checks everything before anyone uses it:
- its digest (`manifest_sha256`: sha256 of the file's bytes with the digest's 64 hex digits
  replaced by zeros), so an edited or damaged manifest is noticed like any other changed file;
- the schema version;
- the model is a known preset, exactly; the shape profile is one that preset supports;
- every path is relative, normalised and plain (`files.check_relpath`); names are identifiers;
- every graph's input and output shapes follow from the model and the profile (the DiT, the text
  encoder and the VAE's video/latent tensors exactly; any other tensor is bounded by the
  profile's pixel count), so no shape in a manifest can make a reader allocate more than the
  profile implies.
The digest detects accidents and hand edits; it is not a signature (anyone can recompute it).
What keeps a bundle's reader inside the bundle is the path rules and the bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from turbotrt.core import noise as noise_gen, rcm, sagesla
from turbotrt.core.configs import (
    PRESETS,
    VAE_STRIDE,
    AttentionConfig,
    ShapeProfile,
    WanConfig,
    shape_profile,
)
from turbotrt.core.errors import BundleError
from turbotrt.core.files import UnsafePathError, check_identifier, check_relpath
from turbotrt.core.precision import FLOAT_PRECISIONS, IO_DTYPES, PRECISIONS, QUANT_MODES

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2
DIGEST_KEY = "manifest_sha256"
_DIGEST_FIELD = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')
_ZERO_DIGEST = b"0" * 64
_IO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Engine flavours: standard TensorRT (SageSLA as the AOT plugin) and TensorRT for RTX (no plugins).
ENGINE_FLAVOURS = ("tensorrt", "tensorrt-rtx")
# How an engine computes SageSLA: the plugin's low-bit kernel, or the op's ONNX function body (the
# float gather-based sparse core) inlined by the builder; "none" for graphs without the op.
ATTENTION_IMPLEMENTATIONS = ("sagesla-plugin", "function-body", "none")
# Per-tensor and per-graph element bounds, in units of the profile's pixels (batch x height x width):
# the largest VAE cache of the real Wan VAE holds 192 values per pixel, all of them together ~2,400.
MAX_TENSOR_PER_PIXEL = 256
MAX_GRAPH_PER_PIXEL = 4096


def _fail(msg: str) -> BundleError:
    return BundleError(f"invalid manifest: {msg}; export the bundle again")


def _get(d: Mapping, key: str, kind, what: str):
    if not isinstance(d, Mapping) or key not in d:
        raise _fail(f"{what} lacks {key!r}")
    value = d[key]
    if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise _fail(f"{what}.{key} is {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


# --- graphs -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IOSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name (IO_DTYPES)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def random(self, rng):
        """Seeded sample input of this shape (numpy; ints in {0, 1})."""
        import numpy as np

        if self.dtype.startswith("int"):
            return rng.integers(0, 2, self.shape).astype(self.dtype)
        out = rng.standard_normal(self.shape).astype(np.float32)
        if self.dtype == "bfloat16":
            import ml_dtypes

            return out.astype(ml_dtypes.bfloat16)
        return out.astype(self.dtype)

    @classmethod
    def from_dict(cls, d, what: str) -> "IOSpec":
        name = _get(d, "name", str, what)
        if not _IO_NAME.fullmatch(name):
            raise _fail(f"{what}: tensor name {name!r} is not a plain identifier")
        shape = _get(d, "shape", list, what)
        if not 1 <= len(shape) <= 8 or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 2**31 - 1
                                           for s in shape):
            raise _fail(f"{what}.{name}: shape {shape} is not a static shape of positive ints")
        dtype = _get(d, "dtype", str, what)
        if dtype not in IO_DTYPES:
            raise _fail(f"{what}.{name}: dtype {dtype!r} is not one of {', '.join(IO_DTYPES)}")
        return cls(name, tuple(shape), dtype)


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max|a-b| <= atol + rtol * max|b| and cosine(a, b) >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float
    why: str = ""

    @classmethod
    def from_dict(cls, d, what: str) -> "Tolerance":
        vals = [_get(d, k, (int, float), what) for k in ("atol", "rtol", "min_cosine")]
        if not all(math.isfinite(v) and v >= 0 for v in vals) or vals[2] > 1:
            raise _fail(f"{what}: tolerance {vals} out of range")
        return cls(*map(float, vals), str(d.get("why", "")))


@dataclass(frozen=True)
class GraphSpec:
    """One graph's static inputs, outputs, precision and validation tolerance."""

    network: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    precision: str
    tolerance: Tolerance
    extra: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def input(self, name: str) -> IOSpec:
        return next(i for i in self.inputs if i.name == name)

    def output(self, name: str) -> IOSpec:
        return next(o for o in self.outputs if o.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = [asdict(i) for i in self.inputs]
        d["outputs"] = [asdict(o) for o in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d, what: str) -> "GraphSpec":
        network = check_identifier(_get(d, "network", str, what), f"{what}.network")
        inputs = tuple(IOSpec.from_dict(i, f"{what}.inputs") for i in _get(d, "inputs", list, what))
        outputs = tuple(IOSpec.from_dict(o, f"{what}.outputs") for o in _get(d, "outputs", list, what))
        names = [i.name for i in inputs + outputs]
        if not inputs or not outputs or len(set(names)) != len(names):
            raise _fail(f"{what}: inputs/outputs missing or named twice")
        precision = _get(d, "precision", str, what)
        if precision not in FLOAT_PRECISIONS:
            raise _fail(f"{what}: precision {precision!r} is not one of {', '.join(FLOAT_PRECISIONS)}")
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise _fail(f"{what}.extra is not an object")
        return cls(network, inputs, outputs, precision, Tolerance.from_dict(_get(d, "tolerance", dict, what), what), extra)


@dataclass(frozen=True)
class GraphEntry:
    file: str  # the .onnx, relative to the bundle
    data: str | None  # its external-data file, if any
    spec: GraphSpec

    def to_dict(self) -> dict:
        return dict(file=self.file, data=self.data, spec=self.spec.to_dict())


@dataclass(frozen=True)
class EngineEntry:
    """One built engine: what `Bundle.engine` matches on, and how it was built."""

    file: str
    flavour: str  # ENGINE_FLAVOURS
    target: str  # compute capability it was built for, "sm_89"
    library_version: str  # TensorRT (or TensorRT for RTX) version that built it
    sha256: str
    bytes: int
    attention: str  # ATTENTION_IMPLEMENTATIONS
    hardware_compatibility: str = "none"  # "ampere_plus": runs on any sm_80+ GPU
    version_compatible: bool = False
    details: dict = field(default_factory=dict)  # build settings and plugin facts, informative

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, what: str) -> "EngineEntry":
        entry = cls(
            file=check_relpath(_get(d, "file", str, what), f"{what}.file"),
            flavour=_get(d, "flavour", str, what), target=_get(d, "target", str, what),
            library_version=_get(d, "library_version", str, what), sha256=_get(d, "sha256", str, what),
            bytes=_get(d, "bytes", int, what), attention=_get(d, "attention", str, what),
            hardware_compatibility=str(d.get("hardware_compatibility", "none")),
            version_compatible=bool(d.get("version_compatible", False)), details=dict(d.get("details") or {}),
        )
        if entry.flavour not in ENGINE_FLAVOURS or entry.attention not in ATTENTION_IMPLEMENTATIONS:
            raise _fail(f"{what}: unknown flavour {entry.flavour!r} or attention {entry.attention!r}")
        if not re.fullmatch(r"sm_\d{2,3}a?", entry.target) or not _SHA256.fullmatch(entry.sha256):
            raise _fail(f"{what}: bad target {entry.target!r} or sha256")
        if not entry.file.startswith("engines/"):
            raise _fail(f"{what}: engine file {entry.file!r} is not under engines/")
        return entry


# --- sampling and quantization ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    sigma_max: float
    boundary: float | None
    experts: tuple[str, ...]  # () for one DiT
    noise: str = noise_gen.GENERATOR
    noise_version: int = noise_gen.VERSION

    @classmethod
    def for_model(cls, config: WanConfig) -> "Sampler":
        return cls(config.sigma_max, config.boundary, tuple(config.experts))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["experts"] = list(self.experts)
        # What the network sees at each step, for readers that do not compute the schedule.
        d["net_timesteps"] = {s: rcm.net_timesteps(rcm.rcm_times(s, self.sigma_max)).tolist()
                              for s in range(1, rcm.MAX_STEPS + 1)}
        return d


@dataclass(frozen=True)
class Quantization:
    """What calibration did to the bundle's DiT graphs (`precision` int8/fp8)."""

    mode: str  # QUANT_MODES
    float_precision: str  # the float type of everything that is not quantized
    observer: str
    config_hash: str
    networks: tuple[str, ...]  # the graphs that carry Q/DQ
    quantized_linears: tuple[str, ...]
    cache: str  # calibration cache file, relative
    report: str  # quality report file, relative
    details: dict = field(default_factory=dict)  # formats, SmoothQuant, weight source: informative

    def to_dict(self) -> dict:
        d = asdict(self)
        d["networks"], d["quantized_linears"] = list(self.networks), list(self.quantized_linears)
        return d

    @classmethod
    def from_dict(cls, d, what: str = "quantization") -> "Quantization":
        q = cls(
            mode=_get(d, "mode", str, what), float_precision=_get(d, "float_precision", str, what),
            observer=_get(d, "observer", str, what), config_hash=_get(d, "config_hash", str, what),
            networks=tuple(check_identifier(n, f"{what}.networks") for n in _get(d, "networks", list, what)),
            quantized_linears=tuple(str(n) for n in _get(d, "quantized_linears", list, what)),
            cache=check_relpath(_get(d, "cache", str, what), f"{what}.cache"),
            report=check_relpath(_get(d, "report", str, what), f"{what}.report"),
            details=dict(d.get("details") or {}),
        )
        if q.mode not in QUANT_MODES or q.float_precision not in FLOAT_PRECISIONS:
            raise _fail(f"{what}: mode {q.mode!r} / float precision {q.float_precision!r} unknown")
        return q


# --- the manifest -------------------------------------------------------------------------------------

@dataclass
class Manifest:
    model: WanConfig
    profile: ShapeProfile
    attention: AttentionConfig
    precision: str  # PRECISIONS
    sampler: Sampler
    graphs: dict[str, GraphEntry]
    tokenizer: str | None = None  # relative path of the tokenizer model
    quantization: Quantization | None = None
    engines: dict[str, list[EngineEntry]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    validation: list[dict] = field(default_factory=list)  # reports made at export time (informative)
    lint: dict[str, list[str]] = field(default_factory=dict)  # TensorRT lint findings per graph
    schema_version: int = SCHEMA_VERSION

    @property
    def float_precision(self) -> str:
        return self.quantization.float_precision if self.quantization else self.precision

    # --- writing ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            DIGEST_KEY: _ZERO_DIGEST.decode(),
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "profile": self.profile.to_dict(),
            "attention": self.attention.to_dict(),
            "sagesla_op": dict(domain=sagesla.DOMAIN, op_type=sagesla.OP_TYPE, plugin=sagesla.PLUGIN_NAME,
                               plugin_version=sagesla.PLUGIN_VERSION) if self.attention.sparse else None,
            "precision": self.precision,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "sampler": self.sampler.to_dict(),
            "graphs": {n: g.to_dict() for n, g in self.graphs.items()},
            "tokenizer": self.tokenizer,
            "engines": {n: [e.to_dict() for e in entries] for n, entries in self.engines.items()},
            "files": dict(sorted(self.files.items())),
            "validation": self.validation,
            "lint": self.lint,
        }

    def to_json(self) -> bytes:
        """The file's bytes, digest included."""
        return sealed_json(self.to_dict())

    # --- reading ---------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, raw: bytes, verify_digest: bool = True, where: str = MANIFEST) -> "Manifest":
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{where} is not valid JSON ({e}); export the bundle again") from None
        if not isinstance(d, dict):
            raise BundleError(f"{where} is not a JSON object; export the bundle again")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{where}: bundle schema version {version!r}, this turbotrt reads version "
                              f"{SCHEMA_VERSION}; export it again with this version (or install the turbotrt that "
                              f"wrote it)")
        if verify_digest:
            check_digest(raw, where)
        try:
            return cls.from_dict(d)
        except UnsafePathError as e:
            raise BundleError(f"{where}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        model = _model(_get(d, "model", dict, "manifest"))
        profile = _profile(_get(d, "profile", dict, "manifest"), model)
        try:
            attention = AttentionConfig(**_get(d, "attention", dict, "manifest"))
        except (TypeError, ValueError) as e:
            raise _fail(f"attention: {e}") from None
        precision = _get(d, "precision", str, "manifest")
        if precision not in PRECISIONS:
            raise _fail(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        q = d.get("quantization")
        quantization = Quantization.from_dict(q) if q is not None else None
        if (quantization is not None) != (precision in QUANT_MODES) or (quantization and quantization.mode != precision):
            raise _fail(f"precision {precision!r} and quantization {q and q.get('mode')!r} disagree")
        s = _get(d, "sampler", dict, "manifest")
        sampler = Sampler(float(_get(s, "sigma_max", (int, float), "sampler")), s.get("boundary"),
                          tuple(_get(s, "experts", list, "sampler")), str(_get(s, "noise", str, "sampler")),
                          int(_get(s, "noise_version", int, "sampler")))
        if (sampler.sigma_max, sampler.boundary, sampler.experts) != (model.sigma_max, model.boundary, model.experts):
            raise _fail(f"the sampler settings differ from preset {model.name}'s")
        if (sampler.noise, sampler.noise_version) != (noise_gen.GENERATOR, noise_gen.VERSION):
            raise _fail(f"noise generator {sampler.noise} v{sampler.noise_version} is not this turbotrt's "
                        f"({noise_gen.GENERATOR} v{noise_gen.VERSION})")
        graphs = {}
        for name, g in _get(d, "graphs", dict, "manifest").items():
            check_identifier(name, "graph name")
            what = f"graphs.{name}"
            spec = GraphSpec.from_dict(_get(g, "spec", dict, what), f"{what}.spec")
            if spec.network != name:
                raise _fail(f"{what}: its spec is for {spec.network!r}")
            data = g.get("data")
            graphs[name] = GraphEntry(check_relpath(_get(g, "file", str, what), f"{what}.file"),
                                      None if data is None else check_relpath(data, f"{what}.data"), spec)
            _check_bounds(spec, model, profile)
        if not graphs:
            raise _fail("no graphs")
        tokenizer = d.get("tokenizer")
        if tokenizer is not None:
            check_relpath(tokenizer, "tokenizer")
        files = _get(d, "files", dict, "manifest")
        for rel, digest in files.items():
            check_relpath(rel, "files")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise _fail(f"files[{rel!r}] is not a sha256 hex digest")
        engines = {}
        for name, entries in (d.get("engines") or {}).items():
            if name not in graphs or not isinstance(entries, list):
                raise _fail(f"engines for unknown graph {name!r}")
            engines[name] = [EngineEntry.from_dict(e, f"engines.{name}") for e in entries]
        m = cls(model, profile, attention, precision, sampler, graphs, tokenizer, quantization, engines, dict(files),
                list(d.get("validation") or []), dict(d.get("lint") or {}))
        unlisted = [f for f in m.referenced_files() if f not in files]
        if unlisted:
            raise _fail(f"{', '.join(unlisted)} not covered by a sha256 in `files`")
        return m

    def referenced_files(self) -> list[str]:
        """Every file the manifest points at (each must have a hash in `files`)."""
        out = []
        for g in self.graphs.values():
            out += [g.file] + ([g.data] if g.data else [])
        if self.tokenizer:
            out.append(self.tokenizer)
        if self.quantization:
            out += [self.quantization.cache, self.quantization.report]
        out += [e.file for entries in self.engines.values() for e in entries]
        return out


def sealed_json(d: dict) -> bytes:
    """`d` as manifest bytes with its digest filled in (`d` must start with DIGEST_KEY)."""
    if next(iter(d), None) != DIGEST_KEY:
        d = {DIGEST_KEY: None, **{k: v for k, v in d.items() if k != DIGEST_KEY}}
    d[DIGEST_KEY] = _ZERO_DIGEST.decode()
    raw = (json.dumps(d, indent=2, default=_json_default) + "\n").encode()
    return raw.replace(_ZERO_DIGEST, hashlib.sha256(raw).hexdigest().encode(), 1)


def check_digest(raw: bytes, where: str = MANIFEST) -> None:
    found = _DIGEST_FIELD.search(raw)
    if found is None:
        raise BundleError(f"{where} has no {DIGEST_KEY}; export the bundle again")
    digest = found.group(1).decode()
    zeroed = raw[:found.start(1)] + _ZERO_DIGEST + raw[found.end(1):]
    if hashlib.sha256(zeroed).hexdigest() != digest:
        raise BundleError(f"{where} changed since it was written (its {DIGEST_KEY} does not match): it was edited "
                          f"or damaged; export the bundle again (or pass --no-verify to skip the check)")


def _json_default(o: Any):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _model(d: dict) -> WanConfig:
    name = _get(d, "name", str, "model")
    preset = PRESETS.get(name)
    if preset is None:
        raise _fail(f"model {name!r} is not a preset of this turbotrt ({', '.join(PRESETS)})")
    mine = preset.to_dict()
    differs = sorted(k for k in set(mine) | set(d) if _plain(d.get(k)) != _plain(mine.get(k)))
    if differs:
        raise _fail(f"the model differs from preset {name!r} in {', '.join(differs)}")
    return preset


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _profile(d: dict, model: WanConfig) -> ShapeProfile:
    try:
        profile = shape_profile(_get(d, "resolution", str, "profile"), _get(d, "frames", int, "profile"),
                                _get(d, "aspect", str, "profile"), model)
    except ValueError as e:
        raise _fail(f"profile: {e}") from None
    if d.get("batch", 1) != profile.batch or (d.get("width"), d.get("height")) != (profile.width, profile.height):
        raise _fail(f"profile {d} does not match {profile.name} ({profile.width}x{profile.height}, batch 1)")
    return profile


def _check_bounds(spec: GraphSpec, model: WanConfig, profile: ShapeProfile) -> None:
    """Shapes follow from the model and the profile; nothing exceeds what the profile implies."""
    b, H, W = profile.batch, profile.height, profile.width
    pixels = b * H * W
    latent = (b, *profile.latent_shape(model.out_dim))
    lt, h, w = latent[2:]
    exact = {}
    name = spec.network
    if name.startswith("dit"):
        exact = {"x": latent, "t_freq": (b, model.freq_dim), "context": (b, model.text_len, model.text_dim),
                 "velocity": latent}
        if model.is_i2v:
            exact["y"] = (b, model.in_dim - model.out_dim, lt, h, w)
    elif name == "text_encoder":
        exact = {"ids": (b, model.text_len), "mask": (b, model.text_len), "context": (b, model.text_len, model.text_dim)}
    elif name.startswith("vae_"):
        frames = 1 if name.endswith("_first") else VAE_STRIDE[0]
        exact = {"z": (b, model.out_dim, 1, h, w), "video": (b, 3, frames, H, W)}
    total = 0
    for io in spec.inputs + spec.outputs:
        want = exact.get(io.name)
        if want is not None and io.shape != tuple(want):
            raise _fail(f"graphs.{name}: {io.name} has shape {list(io.shape)}, but model {model.name} at "
                        f"{profile.name} implies {list(want)}")
        if io.numel > MAX_TENSOR_PER_PIXEL * pixels:
            raise _fail(f"graphs.{name}: {io.name} {list(io.shape)} is larger than profile {profile.name} allows")
        total += io.numel
    missing = [n for n in exact if n not in spec.input_names + spec.output_names]
    if missing:
        raise _fail(f"graphs.{name} lacks {', '.join(missing)}")
    if total > MAX_GRAPH_PER_PIXEL * pixels:
        raise _fail(f"graphs.{name}: its inputs and outputs are larger than profile {profile.name} allows")
