"""Wan2.1 VAE: layout, streaming caches, frame rules, normalisation and checkpoint loading.

Everything runs the `wan-vae-tiny` preset at 32x32 pixels (4x4 latents) or smaller; the full preset
is only built on `meta`.
"""

import pytest
import torch

from turbotrt.models.checkpoint import CheckpointError, save_state_dict
from turbotrt.core.configs import PRESETS, VAE_STRIDE
from turbotrt.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    build_vae,
    check_video_size,
    decode_cache_spec,
    denormalize_latents,
    encode_cache_spec,
    get_vae_config,
    latent_frames,
    list_vae_configs,
    load_vae,
    normalize_latents,
    random_vae_state_dict,
    video_frames,
)

TINY = "wan-vae-tiny"


def tiny_model(dtype=torch.float32, seed=0):
    model = build_vae(TINY, "cpu")
    model.load_state_dict(random_vae_state_dict(TINY, seed=seed))
    return model.to(dtype)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def inputs(t_latent=3, frames=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, t_latent, 4, 4, generator=g).to(dtype)
    x = (torch.rand(1, 3, frames, 32, 32, generator=g) * 2 - 1).to(dtype)
    return z, x


# --- presets and layout ---------------------------------------------------------------------------


def test_presets_and_unknown_name():
    assert list_vae_configs() == ["wan2.1-vae", "wan-vae-tiny"]
    full, tiny = get_vae_config("wan2.1-vae"), get_vae_config(TINY)
    assert (full.dim, full.z_dim, full.dim_mult, full.num_res_blocks) == (96, 16, (1, 2, 4, 4), 2)
    assert full.temporal_downsample == tiny.temporal_downsample == (False, True, True)
    assert full.stride == tiny.stride == tuple(VAE_STRIDE) == (4, 8, 8)
    for dit in PRESETS.values():  # every DiT preset names a VAE preset that exists
        assert get_vae_config(dit.vae).z_dim == dit.out_dim
    with pytest.raises(ValueError, match=r"unknown VAE preset 'wan2.2-vae'.*wan2\.1-vae, wan-vae-tiny"):
        get_vae_config("wan2.2-vae")


def test_full_preset_on_meta_has_wan_layout():
    model = build_vae("wan2.1-vae")  # meta: no memory
    assert model.conv2.weight.is_meta
    # Parameter and key counts of Wan's own module built with dim 96 (Wan2.1_VAE.pth: ~127M).
    assert sum(p.numel() for p in model.parameters()) == 126_892_531
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 194
    assert shapes["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert shapes["encoder.downsamples.0.residual.0.gamma"] == (96, 1, 1, 1)
    assert shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["encoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["encoder.head.2.weight"] == (32, 384, 3, 3, 3)
    assert shapes["conv1.weight"] == (32, 32, 1, 1, 1) and shapes["conv2.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.3.resample.1.weight"] == (192, 384, 3, 3)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    assert not any(".time_conv" in k for k in shapes if k.startswith("decoder.upsamples.11."))  # 2D upsampler


def test_cache_layout_full_preset_480p():
    dec = decode_cache_spec("wan2.1-vae", 60, 104)
    assert len(dec) == 32
    assert dec[0] == ("decoder.conv1", (1, 16, 2, 60, 104))
    assert dec[-1] == ("decoder.head.2", (1, 96, 2, 480, 832))
    assert dict(dec)["decoder.upsamples.3.time_conv"] == (1, 384, 2, 60, 104)
    assert dict(dec)["decoder.upsamples.7.time_conv"] == (1, 384, 2, 120, 208)
    assert [i for i, (name, _) in enumerate(dec) if name.endswith("time_conv")] == [11, 18]
    by_size = {}
    for _, s in dec:
        by_size[s[3:]] = by_size.get(s[3:], 0) + 1
    assert by_size == {(60, 104): 12, (120, 208): 7, (240, 416): 6, (480, 832): 7}
    enc = encode_cache_spec("wan2.1-vae", 480, 832, batch=2)
    assert len(enc) == 24
    assert enc[0] == ("encoder.conv1", (2, 3, 2, 480, 832))
    assert dict(enc)["encoder.downsamples.5.time_conv"] == (2, 192, 1, 120, 208)
    assert dict(enc)["encoder.downsamples.8.time_conv"] == (2, 384, 1, 60, 104)


def test_first_and_step_caches_share_one_fixed_layout(tiny):
    z, x = inputs()
    spec = decode_cache_spec(TINY, 4, 4)
    f0, c0 = tiny.decode_first(z[:, :, :1])
    f1, c1 = tiny.decode_step(z[:, :, 1:2], c0)
    assert f0.shape == (1, 3, 1, 32, 32) and f1.shape == (1, 3, 4, 32, 32)
    assert len(spec) == len(c0) == len(c1) == 24
    assert [s for _, s in spec] == [tuple(t.shape) for t in c0] == [tuple(t.shape) for t in c1]
    # Wan's first frame bypasses the temporal upsamplers, so their slots are still empty after it.
    upsamplers = {name for name, _ in spec if name.endswith("time_conv")}
    assert upsamplers == {"decoder.upsamples.2.time_conv", "decoder.upsamples.5.time_conv"}
    for (name, _), t0, t1 in zip(spec, c0, c1):
        if name in upsamplers:
            assert not t0.any(), name
        else:  # a conv's history after one frame: [zeros, that frame]
            assert not t0[:, :, 0].any() and t0[:, :, 1].abs().min() > 0, name
        # After step 1 only the first upsampler (one frame per step at its level) still has an empty
        # slot, because the clip's first frame never entered its history (Wan's 'Rep' case).
        assert t1[:, :, 1].any() and bool(t1[:, :, 0].any()) == (name != "decoder.upsamples.2.time_conv"), name
    e_spec = encode_cache_spec(TINY, 32, 32)
    z0, e0 = tiny.encode_first(x[:, :, :1])
    z1, e1 = tiny.encode_step(x[:, :, 1:5], e0)
    assert z0.shape == z1.shape == (1, 16, 1, 4, 4)
    assert len(e_spec) == 16
    assert [s for _, s in e_spec] == [tuple(t.shape) for t in e0] == [tuple(t.shape) for t in e1]


# --- streaming equals one causal pass -------------------------------------------------------------

# The whole-clip pass (`*_first` on the full clip: every causal conv front-padded with zeros, no
# cache carried) and the streamed steps compute each output from the same inputs, but not always
# with the same summation order: CPU reductions (the channel norm, convolutions) vectorise
# differently for different tensor shapes, so exact equality does not hold in fp32/fp64 (measured:
# ~3e-15 relative in fp64, ~1.2e-6 in fp32). Tolerances are relative to the output's max |value|;
# a cache or first-frame bug gives O(1) differences.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_decode_matches_whole_clip_pass(dtype):
    model = tiny_model(dtype)
    z, _ = inputs(t_latent=5, dtype=dtype)
    streamed = model.decode(z)
    whole, _ = model.decode_first(z)
    assert streamed.shape == whole.shape == (1, 3, 17, 32, 32)
    assert (streamed - whole).abs().max() <= TOL[dtype] * whole.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_encode_matches_whole_clip_pass(dtype):
    model = tiny_model(dtype)
    _, x = inputs(frames=17, dtype=dtype)
    streamed = model.encode(x)
    whole, _ = model.encode_first(x)
    assert streamed.shape == whole.shape == (1, 16, 5, 4, 4)
    assert (streamed - whole).abs().max() <= TOL[dtype] * whole.abs().max()


def test_steps_can_resume_from_a_whole_clip_prefix(tiny):
    z, _ = inputs(t_latent=4)
    head, cache = tiny.decode_first(z[:, :, :2])
    tail, _ = tiny.decode_step(z[:, :, 2:], cache)
    ref = tiny.decode(z)
    assert torch.cat([head, tail], 2).shape == ref.shape
    assert (torch.cat([head, tail], 2) - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()


def test_decode_and_encode_are_causal(tiny):
    z, x = inputs(t_latent=3)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    a, b = tiny.decode_first(z)[0], tiny.decode_first(z2)[0]
    assert torch.equal(a[:, :, :5], b[:, :, :5])  # latent frames 0, 1 -> video frames 0..4
    assert not torch.equal(a[:, :, 5:], b[:, :, 5:])
    x2 = x.clone()
    x2[:, :, 5:] = 0.0
    a, b = tiny.encode_first(x)[0], tiny.encode_first(x2)[0]
    assert torch.equal(a[:, :, :2], b[:, :, :2])  # frames 0..4 -> latent frames 0, 1
    assert not torch.equal(a[:, :, 2], b[:, :, 2])


def test_matches_wan_reference_fingerprint(tiny):
    # Projections of Wan's own WanVAE_.decode / .encode (with its scale=[mean, 1/std]) on the same
    # seeded weights and inputs, float32; the model reproduced them bit for bit on the machine that
    # recorded them. atol 1e-3 on values of size ~20 leaves room for other CPUs' float rounding;
    # wrong frame order, first-frame handling or channel layout moves them by whole units.
    z, x = inputs()
    g = torch.Generator().manual_seed(0)
    torch.randn(1, 16, 3, 4, 4, generator=g), torch.rand(1, 3, 9, 32, 32, generator=g)  # advance as in `inputs`
    wd = torch.randn(3, 32, 32, generator=g, dtype=torch.float64)
    we = torch.randn(16, 4, 4, generator=g, dtype=torch.float64)
    y, e = tiny.decode(z), tiny.encode(x)
    dec = (y[0].double().transpose(0, 1) * wd).sum((1, 2, 3))
    enc = (e[0].double().transpose(0, 1) * we).sum((1, 2, 3))
    want_dec = [29.69143, 20.76133, 4.35239, -22.74386, 46.63098, -3.71591, 21.09046, -16.59925, 24.44276]
    want_enc = [-8.20507, -0.63372, -7.23636]
    torch.testing.assert_close(dec, torch.tensor(want_dec, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(enc, torch.tensor(want_enc, dtype=torch.float64), atol=1e-3, rtol=0)


# --- frame and size rules -------------------------------------------------------------------------


def test_81_frames_round_trip_shapes(tiny):
    assert latent_frames(81) == 21 and video_frames(21) == 81 and latent_frames(1) == 1
    x = torch.rand(1, 3, 81, 16, 24) * 2 - 1  # small and non-square, to catch a swapped H/W
    z = tiny.encode(x)
    assert z.shape == (1, 16, 21, 2, 3)
    assert tiny.decode(z).shape == (1, 3, 81, 16, 24)


def test_frame_and_size_errors_say_what_is_supported(tiny):
    for bad in (0, 80, 82, -3, 4.0):
        with pytest.raises(ValueError, match=r"4k\+1 video frames \(1, 5, \.\.\., 81"):
            latent_frames(bad)
    with pytest.raises(ValueError, match="at least one latent frame"):
        video_frames(0)
    assert check_video_size(480, 832) == (60, 104)
    for h, w in ((36, 32), (32, 4), (0, 8)):
        with pytest.raises(ValueError, match=f"multiples of 8.*got {h}x{w}"):
            check_video_size(h, w)
    with pytest.raises(ValueError, match="4k\\+1 video frames.*got 8"):
        tiny.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8.*got 32x36"):
        tiny.encode(torch.zeros(1, 3, 5, 32, 36))
    _, cache = tiny.encode_first(torch.zeros(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match="groups of 4 frames.*got 3"):
        tiny.encode_step(torch.zeros(1, 3, 3, 32, 32), cache)
    with pytest.raises(ValueError, match=r"latents must be \[B, 16"):
        tiny.decode(torch.zeros(1, 4, 2, 4, 4))


def test_bad_caches_are_rejected(tiny):
    z, _ = inputs()
    _, cache = tiny.decode_first(z[:, :, :1])
    with pytest.raises(ValueError, match="pass the cache"):
        tiny.decode_step(z[:, :, 1:2], None)
    with pytest.raises(ValueError, match="cache has 23 tensors"):
        tiny.decode_step(z[:, :, 1:2], cache[:-1])
    with pytest.raises(ValueError, match="cache has 25 tensors, the model uses 24"):
        tiny.decode_step(z[:, :, 1:2], (*cache, cache[0]))
    bad = (cache[0][:, :, :1], *cache[1:])
    with pytest.raises(ValueError, match=r"cache tensor 0 \(decoder.conv1\) has shape \(1, 16, 1, 4, 4\)"):
        tiny.decode_step(z[:, :, 1:2], bad)


# --- latent normalisation -------------------------------------------------------------------------


def test_latent_normalisation():
    assert len(LATENT_MEAN) == len(LATENT_STD) == 16
    assert (LATENT_MEAN[0], LATENT_MEAN[7], LATENT_MEAN[15]) == (-0.7571, 1.5508, -0.2921)
    assert (LATENT_STD[0], LATENT_STD[8], LATENT_STD[15]) == (2.8184, 3.2687, 1.9160)
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=torch.float64).view(1, 16, 1, 1, 1)
    z = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64) * 3
    torch.testing.assert_close(normalize_latents(z), (z - mean) / std, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z)), z, rtol=1e-14, atol=1e-14)
    z32 = z.float()
    torch.testing.assert_close(denormalize_latents(normalize_latents(z32)), z32, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="16 channels"):
        normalize_latents(torch.zeros(1, 48, 2, 2, 2))


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,dtype", [(".pth", torch.float32), (".safetensors", torch.bfloat16)])
def test_checkpoint_round_trip(tmp_path, suffix, dtype):
    sd = random_vae_state_dict(TINY, seed=3, dtype=dtype)
    path = save_state_dict(sd, tmp_path / f"vae{suffix}")
    model = load_vae(path)
    assert model.config.name == TINY and model.dtype == dtype
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert loaded[k].dtype == dtype and torch.equal(loaded[k], v), k
    assert load_vae(path, TINY, dtype=torch.float32).dtype == torch.float32


def test_truncated_or_foreign_checkpoints_name_the_problem(tmp_path):
    sd = random_vae_state_dict(TINY)
    broken = dict(sd)
    del broken["decoder.head.2.bias"], broken["encoder.middle.1.proj.weight"]
    broken["decoder.extra.weight"] = torch.zeros(2)
    broken["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_vae(save_state_dict(broken, tmp_path / "broken.pth"))
    msg = str(e.value)
    assert "'wan-vae-tiny'" in msg
    for key in ("decoder.head.2.bias", "encoder.middle.1.proj.weight", "decoder.extra.weight", "conv2.weight"):
        assert key in msg
    # A tiny checkpoint forced into the full preset says which preset it does fit.
    with pytest.raises(CheckpointError, match="fits preset 'wan-vae-tiny'"):
        load_vae(save_state_dict(sd, tmp_path / "tiny.safetensors"), "wan2.1-vae")
    # A file cut short cannot be read at all.
    whole = save_state_dict(sd, tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError):
        load_vae(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not a Wan VAE checkpoint"):
        load_vae(save_state_dict({"blocks.0.ffn.0.weight": torch.zeros(2, 2)}, tmp_path / "dit.pth"))
