"""rCM sampling with the PyTorch reference DiT: the loop every runtime output is compared with.

The schedule and update rules live in `turbotrt.core.rcm` (numpy) and the bundles' noise in
`turbotrt.core.noise`, so the torch-free runtime uses the very same numbers; this module adds the
network calls (and TurboDiffusion's own torch-generator noise).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from turbotrt.core.noise import NoiseStream
from turbotrt.core.rcm import expert_for_step, net_timesteps, ode_step, rcm_times, sde_step, validate_steps

__all__ = ["rcm_timesteps", "net_timesteps", "rcm_times", "generate_latents", "make_generator"]


def rcm_timesteps(steps: int, sigma_max: float = 80.0) -> torch.Tensor:
    """steps+1 rectified-flow times (float64), ending at 0."""
    return torch.from_numpy(rcm_times(steps, sigma_max))


def make_generator(seed: int, device="cpu") -> torch.Generator:
    """One seeded generator draws the initial noise and then every step's fresh noise, in that order."""
    return torch.Generator(device=device).manual_seed(int(seed))


def _pick_model(model_or_experts, t_cur: float, config):
    if isinstance(model_or_experts, Mapping):
        name = expert_for_step(t_cur, config.boundary, config.experts)
        try:
            return model_or_experts[name]
        except KeyError:
            raise ValueError(f"{config.name} needs experts {config.experts}; got {sorted(model_or_experts)}") from None
    if config.experts:
        raise ValueError(f"{config.name} samples with two experts {config.experts}: pass a dict of models")
    return model_or_experts


@torch.no_grad()
def generate_latents(
    model_or_experts,
    context: torch.Tensor,
    shape: tuple[int, ...],
    steps: int = 4,
    seed: int = 0,
    sigma_max: float | None = None,
    y: torch.Tensor | None = None,
    ode: bool = False,
    noise_device="cpu",
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    noise: str = "torch",
) -> torch.Tensor:
    """Sample latents [B, 16, T, H, W] with rCM; returns fp32.

    As in TurboDiffusion, the state x and the update arithmetic are float64; the network gets x
    rounded to its own dtype and the velocity is widened back to float64.

    model_or_experts: a WanModel, or {"high": WanModel, "low": WanModel} for I2V A14B.
    Noise comes from one torch generator seeded with `seed` on `noise_device` (TurboDiffusion draws
    on the GPU; a CUDA generator's numbers differ from a CPU one's, so say which you compare with).
    callback(step, x, v) sees every step's input and velocity (calibration uses the trajectory).
    noise="philox" draws from `turbotrt.core.noise.NoiseStream(seed)` instead: what bundles sample
    with (Python and C++ runtimes), so a bundle's output can be compared with this reference exactly.
    """
    first = next(iter(model_or_experts.values())) if isinstance(model_or_experts, Mapping) else model_or_experts
    config = first.config
    steps = validate_steps(steps)
    sigma_max = config.sigma_max if sigma_max is None else sigma_max
    times = rcm_times(steps, sigma_max)
    net_t = net_timesteps(times)
    if y is not None and y.shape[0] != shape[0]:
        raise ValueError(f"conditioning batch {y.shape[0]} != latent batch {shape[0]}")

    device = context.device
    if noise == "torch":
        g = make_generator(seed, noise_device)

        def draw():
            return torch.randn(shape, generator=g, dtype=torch.float32, device=noise_device).to(device)
    elif noise == "philox":
        stream = NoiseStream(seed)

        def draw():
            return torch.from_numpy(stream(shape)).to(device)
    else:
        raise ValueError(f"noise must be 'torch' (TurboDiffusion's generator) or 'philox' (bundles'), got {noise!r}")
    x = draw().to(torch.float64) * float(times[0])
    for i in range(steps):
        t_cur, t_next = float(times[i]), float(times[i + 1])
        model = _pick_model(model_or_experts, t_cur, config)
        timestep = torch.full((shape[0], 1), float(net_t[i]), dtype=torch.float32, device=device)
        v = model(x.float(), timestep, context, y).double()
        if callback is not None:
            callback(i, x, v)
        if ode:
            x = ode_step(x, v, t_cur, t_next)
        else:
            x = sde_step(x, v, t_cur, t_next, draw().double())  # drawn at the last step too, as upstream
    return x.float()


def noise_like_reference(shape, seed: int, steps: int) -> list[np.ndarray]:
    """The draws generate_latents makes on a CPU generator, as numpy (initial noise first).

    The torch-free runtime can be fed these to reproduce the reference exactly.
    """
    g = make_generator(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32).numpy() for _ in range(1 + validate_steps(steps))]
