import numpy as np
import pytest
import torch

from turbotrt.models.sampler import generate_latents, noise_like_reference, rcm_timesteps
from turbotrt.core.rcm import expert_for_step, net_timesteps, rcm_times, round_bf16


def test_rcm_times_sigma80_four_steps():
    t = rcm_timesteps(4, 80.0)
    assert t.dtype == torch.float64
    # Values from the rCM schedule; 1e-6 is the precision they are quoted with.
    np.testing.assert_allclose(t.numpy(), [0.987654, 0.933781, 0.852895, 0.608979, 0.0], atol=1e-6)


def test_net_timesteps_are_bf16_rounded():
    assert net_timesteps(rcm_times(4, 80.0)).tolist() == [988.0, 932.0, 852.0, 608.0]
    assert len(net_timesteps(rcm_times(1, 80.0))) == 1


def test_round_bf16_matches_torch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1000
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_bf16(x), ref)


@pytest.mark.parametrize("steps", [0, 5])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match="1 to 4"):
        rcm_times(steps, 80.0)


def test_expert_switch_at_boundary():
    t = rcm_times(4, 200.0)
    experts = [expert_for_step(float(x), 0.9, ("high", "low")) for x in t[:-1]]
    assert experts == ["high", "high", "low", "low"]  # t = 0.995, 0.934, 0.853, 0.609


class _Velocity(torch.nn.Module):
    """A stand-in network: v = a*x + t/1000, so the loop's arithmetic can be checked by hand."""

    def __init__(self, a, config):
        super().__init__()
        self.a, self.config, self.calls = a, config, []

    def forward(self, x, timestep, context, y=None):
        self.calls.append(float(timestep[0, 0]))
        return self.a * x + timestep.view(-1, 1, 1, 1, 1) / 1000


def _manual_loop(shape, seed, steps, a_of_step, ode=False):
    noise = [torch.from_numpy(n) for n in noise_like_reference(shape, seed, steps)]
    t = rcm_times(steps, 80.0)
    net = net_timesteps(t)
    x = noise[0].double() * t[0]
    for i in range(steps):
        v = (a_of_step(i) * x.float() + float(net[i]) / 1000).double()
        if ode:
            x = x - (t[i] - t[i + 1]) * v
        else:
            x = (1 - t[i + 1]) * (x - t[i] * v) + t[i + 1] * noise[i + 1].double()
    return x.float()


@pytest.mark.parametrize("ode", [False, True])
def test_generate_latents_matches_hand_loop(ode):
    from turbotrt.core.configs import get_config

    cfg = get_config("wan-tiny")
    net = _Velocity(0.5, cfg)
    shape = (1, 16, 2, 4, 4)
    x = generate_latents(net, torch.zeros(1, 8, 4), shape, steps=3, seed=7, ode=ode)
    ref = _manual_loop(shape, 7, 3, lambda i: 0.5, ode)
    # Same float64 arithmetic in the same order: equal bit for bit.
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert net.calls == [988.0, 932.0, 852.0]


def test_i2v_uses_both_experts():
    from turbotrt.core.configs import get_config

    cfg = get_config("wan-tiny-i2v")
    high, low = _Velocity(0.1, cfg), _Velocity(0.9, cfg)
    generate_latents({"high": high, "low": low}, torch.zeros(1, 8, 4), (1, 16, 1, 2, 2), steps=4, seed=0,
                     y=torch.zeros(1, 20, 1, 2, 2))
    assert len(high.calls) == 2 and len(low.calls) == 2
    with pytest.raises(ValueError, match="two experts"):
        generate_latents(high, torch.zeros(1, 8, 4), (1, 16, 1, 2, 2), steps=1)


def test_seed_changes_noise():
    a = noise_like_reference((2, 3), 0, 1)
    b = noise_like_reference((2, 3), 1, 1)
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[0], a[1])


def test_timestep_sinusoid_matches_the_model():
    from turbotrt.models.wan import sinusoidal_embedding
    from turbotrt.core.rcm import timestep_sinusoid

    t = torch.tensor([988.0, 0.0, 608.0])
    # Both float64 then rounded once to fp32: equal bit for bit.
    np.testing.assert_array_equal(timestep_sinusoid(t.numpy()), sinusoidal_embedding(256, t).numpy())


def test_philox_noise_stream_is_what_the_reference_draws():
    from turbotrt.core.configs import get_config
    from turbotrt.core.noise import NoiseStream

    cfg = get_config("wan-tiny")
    shape = (1, 16, 1, 2, 2)
    x = generate_latents(_Velocity(0.0, cfg), torch.zeros(1, 8, 4), shape, steps=1, seed=5, noise="philox")
    s = NoiseStream(5)
    n0, n1 = s(shape), s(shape)
    t = rcm_times(1, 80.0)
    v = float(np.float32(net_timesteps(t)[0]) / np.float32(1000))  # the stand-in computes v in fp32
    ref = (1 - t[1]) * (n0.astype(np.float64) * t[0] - t[0] * v) + t[1] * n1
    np.testing.assert_array_equal(x.numpy(), ref.astype(np.float32))
