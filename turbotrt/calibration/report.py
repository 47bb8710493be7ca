"""Quality of a quantized DiT against the float reference, per rCM step and after the whole loop.

Two quantized backends are measured: the Q/DQ graph in ONNX Runtime and the PyTorch fake-quant
model (the same Q/DQ math in eager torch). Node for node the two agree to fp32 rounding; end to end
that rounding can move a value across a quantization boundary (one step) or, under SLA, change a
block selection, so small gaps between them are expected and large ones point at the graph rewrite.
The gap to the float model is the quantization error itself.

- Per step: the DiT's velocity on the float trajectory's own input at that step (teacher forced),
  against the float velocity. Cosine and relative L2 error ||v_q - v|| / ||v||, mean and worst over
  prompts x seeds.
- Final latent: the whole sampling loop run with the quantized model from the same seed (its own
  trajectory, same noise), against the float loop's final latent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from turbotrt.calibration.dataset import CalibrationSet, block_selections, model_device
from turbotrt.core.rcm import timestep_sinusoid


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else float(np.array_equal(a, b))


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


@dataclass
class Quality:
    backend: str  # "onnxruntime" | "pytorch-fakequant"
    step: int | None  # None: the final latent
    timestep: float | None
    cosine_mean: float
    cosine_min: float
    rel_error_mean: float
    rel_error_max: float
    samples: int
    # SLA only, PyTorch backend: share of (head, query block) rows whose kept key blocks differ from
    # the float model's. Top-k selection is discontinuous: a changed row swaps whole key blocks.
    sla_rows_changed: float | None = None

    @classmethod
    def of(cls, backend, step, timestep, pairs, sla_rows_changed=None) -> "Quality":
        cos = [cosine(a, b) for a, b in pairs]
        rel = [rel_error(a, b) for a, b in pairs]
        return cls(backend, step, timestep, float(np.mean(cos)), float(np.min(cos)), float(np.mean(rel)),
                   float(np.max(rel)), len(pairs), sla_rows_changed)


@dataclass
class QuantReport:
    mode: str
    observer: str
    config_hash: str
    preset: str
    profile: str
    evaluated_on: str  # which prompts/seeds the figures come from
    per_step: list[Quality] = field(default_factory=list)
    final_latent: list[Quality] = field(default_factory=list)
    quantized: dict[str, dict] = field(default_factory=dict)  # Linear -> amax, weight scale range, smoothed
    skipped: dict[str, str] = field(default_factory=dict)  # Linear -> why it stays float
    smoothquant: dict = field(default_factory=dict)  # alpha, folded sites, skipped inputs and why
    weight_conversion: dict | None = None  # tile -> per-channel (from a -quant checkpoint)
    notes: list[str] = field(default_factory=list)
    out: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        from turbotrt.core.files import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=2))

    def format(self) -> str:
        lines = [f"{self.preset} {self.profile}: {self.mode} / {self.observer} (config {self.config_hash}), "
                 f"evaluated on {self.evaluated_on}"]
        lines.append(f"  quantized {len(self.quantized)} Linears; float: {len(self.skipped)} Linears "
                     "(embeddings, time MLPs, head, proj_l" + (", excluded" if any(
                         v == 'excluded by the config' for v in self.skipped.values()) else "") + ")")
        if self.smoothquant.get("alpha") is not None:
            lines.append(f"  SmoothQuant alpha {self.smoothquant['alpha']}: folded {len(self.smoothquant['folded'])} sites, "
                         f"skipped {len(self.smoothquant['skipped'])} inputs (time-dependent modulation / GELU)")
        lines.append(f"  {'backend':18s} {'step':>5s} {'t':>6s}  {'cos mean':>9s} {'cos min':>9s}  {'rel mean':>9s} "
                     f"{'rel max':>9s}  SLA rows changed")
        for q in self.per_step + self.final_latent:
            step = "final" if q.step is None else str(q.step)
            t = "" if q.timestep is None else f"{q.timestep:g}"
            sla = "" if q.sla_rows_changed is None else f"  {100 * q.sla_rows_changed:5.1f}%"
            lines.append(f"  {q.backend:18s} {step:>5s} {t:>6s}  {q.cosine_mean:9.6f} {q.cosine_min:9.6f}  "
                         f"{q.rel_error_mean:9.2e} {q.rel_error_max:9.2e}{sla}")
        if self.weight_conversion:
            w = self.weight_conversion
            lines.append(f"  tile -> per-channel weights: max |dW| {w['max_abs']:.3e} (bound {w['bound']:.3e}), "
                         f"relative {w['rel_fro_max']:.2e} worst layer")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class OrtDit:
    """An ONNX DiT step graph behind the PyTorch model's call signature, for `generate_latents`."""

    def __init__(self, path, config, providers=("CPUExecutionProvider",)):
        from turbotrt.export.validate import ort_session

        self.config = config
        self.session = ort_session(path, providers)

    def run_feeds(self, feeds: dict) -> np.ndarray:
        return self.session.run(["velocity"], feeds)[0]

    def __call__(self, x, timestep, context, y=None):
        if y is not None:
            raise ValueError("image-to-video graphs are not evaluated here")
        t = timestep.reshape(-1).double().cpu().numpy()
        feeds = {"x": x.float().cpu().numpy(), "t_freq": timestep_sinusoid(t, self.config.freq_dim),
                 "context": context.float().cpu().numpy()}
        return torch.from_numpy(self.run_feeds(feeds))


@torch.no_grad()
def step_quality(backend: str, model, data: CalibrationSet, freq_dim: int, reference=None) -> list[Quality]:
    """Teacher-forced velocity error at each rCM step (and, given the float `reference` of a PyTorch
    model, how many SLA block selections quantization changed)."""
    out = []
    for step in range(data.steps):
        samples = data.step_samples(step)
        pairs, changed, rows = [], 0, 0
        for s in samples:
            if isinstance(model, OrtDit):
                pairs.append((model.run_feeds(data.feeds(s, freq_dim)), s.velocity.numpy()))
                continue
            args = s.inputs(data, freq_dim, model_device(model))
            with block_selections(model, []) as maps:
                v = model.forward_from_sinusoid(*args)
            pairs.append((v.float().cpu().numpy(), s.velocity.numpy()))
            if reference is not None and maps:
                ref_maps = s.block_maps  # recorded with the sample: the float model need not run again
                if len(ref_maps) != len(maps):
                    with block_selections(reference, []) as ref_maps:
                        reference.forward_from_sinusoid(*s.inputs(data, freq_dim, model_device(reference)))
                for a, b in zip(maps, ref_maps):
                    diff = (a.cpu() != b.cpu().long()).any(dim=-1)
                    changed, rows = changed + int(diff.sum()), rows + diff.numel()
        frac = changed / rows if rows else None
        out.append(Quality.of(backend, step, samples[0].timestep, pairs, frac))
    return out


@torch.no_grad()
def final_quality(backend: str, model, data: CalibrationSet) -> Quality:
    """The quantized model's own sampling loop vs the float loop, same seeds and prompts."""
    from turbotrt.models.sampler import generate_latents

    pairs = []
    device = torch.device("cpu") if isinstance(model, OrtDit) else model_device(model)
    for (p, seed), ref in data.finals.items():
        lat = generate_latents(model, data.contexts[p].to(device), data.shape, steps=data.steps, seed=seed,
                               sigma_max=data.sigma_max)
        pairs.append((lat.cpu().numpy(), ref.numpy()))
    return Quality.of(backend, None, None, pairs)
