"""The rCM few-step schedule and updates in plain numpy, shared by the runtime and the PyTorch reference.

Upstream: TurboDiffusion `rcm/` (the distilled schedule and its SDE/ODE updates); the noise they
re-inject comes from `turbotrt.core.noise`.

rCM samples in 1 to 4 steps with no classifier-free guidance: one DiT call per step.
"""

from __future__ import annotations

import math

import numpy as np

MAX_STEPS = 4
MID_ANGLES = (1.5, 1.4, 1.0)  # intermediate angles of the distilled schedule, in radians


def validate_steps(steps: int) -> int:
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"rCM samples in 1 to {MAX_STEPS} steps; got {steps!r}")
    return int(steps)


def rcm_times(steps: int, sigma_max: float) -> np.ndarray:
    """steps+1 rectified-flow times t (float64), from t(sigma_max) down to 0.

    Angles are atan(sigma_max), the first steps-1 mid angles, then 0; t = sin(a) / (cos(a) + sin(a)).
    """
    steps = validate_steps(steps)
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    angles = np.array([math.atan(sigma_max), *MID_ANGLES[: steps - 1], 0.0], dtype=np.float64)
    return np.sin(angles) / (np.cos(angles) + np.sin(angles))


def round_bf16(x) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def net_timesteps(times: np.ndarray) -> np.ndarray:
    """What the network sees at each step: bf16(fp32(t) * 1000) for every t but the final 0 (float32).

    TurboDiffusion rounds t to fp32, scales by 1000 in float64 and casts to bf16.
    """
    t = np.asarray(times, dtype=np.float64)[:-1].astype(np.float32).astype(np.float64)
    return round_bf16((t * 1000.0).astype(np.float32))


def sde_step(x, v, t_cur: float, t_next: float, noise):
    """rCM's stochastic step: jump to the clean estimate, re-noise to t_next with fresh noise."""
    return (1.0 - t_next) * (x - t_cur * v) + t_next * noise


def ode_step(x, v, t_cur: float, t_next: float):
    """Deterministic Euler step along the flow (I2V's --ode option)."""
    return x - (t_cur - t_next) * v


def timestep_sinusoid(timesteps, dim: int = 256) -> np.ndarray:
    """The DiT's timestep embedding input: cat([cos, sin]) of t * 10000^(-i/(dim/2)), in float64.

    Computed here, not in the graph, because the reference computes it in float64 (returned fp32).
    """
    half = dim // 2
    t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
    angles = np.outer(t, np.power(10000.0, -np.arange(half, dtype=np.float64) / half))
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def expert_for_step(t_cur: float, boundary: float | None, experts: tuple[str, ...]) -> str | None:
    """I2V A14B: the high-noise expert while t >= boundary, then the low-noise expert."""
    if not experts:
        return None
    return experts[0] if t_cur >= boundary else experts[1]
