"""Validate an exported graph: ONNX Runtime against the PyTorch reference on the same inputs.

Checks go names, then shapes, then values (max abs/rel error and cosine per output), so a report
says the most basic thing that is wrong. numpy + onnxruntime only; the reference is a callable.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

from turbotrt.core.errors import TurbotrtError
from turbotrt.core.manifest import GraphSpec, Tolerance


class ValidationError(TurbotrtError):
    pass


@dataclass
class OutputReport:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max|a-b| / max|b|
    cosine: float
    passed: bool


@dataclass
class ValidationReport:
    network: str
    precision: str
    backend: str
    tolerance: Tolerance
    outputs: list[OutputReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def passed(self) -> bool:
        return not self.skipped and not self.problems and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def format(self) -> str:
        head = f"{self.network} ({self.precision}, {self.backend} vs PyTorch)"
        if self.skipped:
            return f"{head}: skipped: {self.skipped}"
        lines = [f"{head}: {'PASS' if self.passed else 'FAIL'}"]
        lines += [f"  problem: {p}" for p in self.problems]
        t = self.tolerance
        for o in self.outputs:
            lines.append(f"  {o.name:16s} {str(o.shape):24s} max_abs {o.max_abs:.3e}  max_rel {o.max_rel:.3e}  "
                         f"cosine {o.cosine:.7f}  {'ok' if o.passed else 'OUT OF TOLERANCE'}")
        lines.append(f"  tolerance: atol {t.atol:g} + rtol {t.rtol:g} * max|ref|, cosine >= {t.min_cosine} ({t.why})")
        return "\n".join(lines)


def compare(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], report: ValidationReport) -> ValidationReport:
    """Fill `report`: names, then shapes, then values."""
    missing = [n for n in reference if n not in outputs]
    extra = [n for n in outputs if n not in reference]
    if missing or extra:
        report.problems.append(f"output names differ: missing {missing}, unexpected {extra}")
        return report
    for name, ref in reference.items():
        out = np.asarray(outputs[name])
        ref = np.asarray(ref)
        if out.shape != ref.shape:
            report.problems.append(f"{name}: shape {out.shape}, reference {ref.shape}")
            continue
        a, b = out.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        if not np.isfinite(a).all():
            report.problems.append(f"{name}: {int((~np.isfinite(a)).sum())} non-finite values")
        diff = np.abs(a - b)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cosine = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
        t = report.tolerance
        ok = max_abs <= t.atol + t.rtol * scale and cosine >= t.min_cosine
        report.outputs.append(OutputReport(name, tuple(out.shape), max_abs, max_abs / scale if scale else max_abs,
                                           cosine, bool(ok)))
    return report


def ort_session(path: str | os.PathLike, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # constant-folding notes about missing CPU kernels are noise here
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def run_onnxruntime(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], providers=("CPUExecutionProvider",)) -> dict:
    sess = ort_session(path, providers)
    names = [i.name for i in sess.get_inputs()]
    if sorted(names) != sorted(feeds):
        raise ValidationError(f"{path}: graph inputs {names}, fed {sorted(feeds)}")
    outs = sess.run(None, dict(feeds))
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def validate_onnx(
    path: str | os.PathLike,
    spec: GraphSpec,
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: Mapping[str, np.ndarray] | None = None,
    providers=("CPUExecutionProvider",),
) -> ValidationReport:
    """Run the graph in ONNX Runtime and the reference on the same feeds; compare per spec tolerance."""
    report = ValidationReport(spec.network, spec.precision, "onnxruntime:" + ",".join(providers), spec.tolerance)
    if spec.precision == "bf16" and list(providers) == ["CPUExecutionProvider"]:
        report.skipped = ("ONNX Runtime's CPU provider has no bf16 kernels for these ops; validate bf16 graphs "
                          "with the CUDA provider or TensorRT, or export fp32/fp16 to check the math on a CPU")
        return report
    if feeds is None:
        from turbotrt.export.networks import random_feeds

        feeds = random_feeds(spec)
    feeds = dict(feeds)
    try:
        outputs = run_onnxruntime(path, feeds, providers)
    except ValidationError as e:
        report.problems.append(str(e))
        return report
    return compare(outputs, reference(feeds), report)
