import numpy as np
import pytest
import torch

from turbotrt.core.configs import get_config, shape_profile
from turbotrt.models.pipeline import ReferencePipeline, i2v_condition
from turbotrt.core.video import latents_video_to_uint8, read_mp4, write_mp4


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return ReferencePipeline.tiny("wan-tiny", workdir=tmp_path_factory.mktemp("t2v"))


def test_tiny_t2v_writes_a_playable_mp4(t2v, tmp_path):
    profile = shape_profile("tiny", 17, config=t2v.config)
    video = t2v("a red bird flies over the river", seed=3, steps=2, profile=profile)
    assert video.frames.shape == (17, 64, 128, 3) and video.frames.dtype == np.uint8
    assert video.latents.shape == (1, 16, 5, 8, 16)
    assert video.frames.std() > 1.0  # not a blank video
    path = video.save(tmp_path / "out.mp4")
    back = read_mp4(path)
    assert back.shape == video.frames.shape
    # The random tiny model makes noise-like frames, which 4:2:0 H.264 cannot keep pixel for pixel;
    # the frame count, size and per-frame brightness survive.
    np.testing.assert_allclose(back.mean(axis=(1, 2, 3)), video.frames.mean(axis=(1, 2, 3)), atol=4)


def test_mp4_round_trip_of_smooth_frames(tmp_path):
    t, h, w = np.meshgrid(np.arange(9), np.arange(32), np.arange(48), indexing="ij")
    frames = np.stack([(t * 20 + h * 3) % 256, (w * 5) % 256, np.full_like(t, 90)], axis=-1).astype(np.uint8)
    back = read_mp4(write_mp4(frames, tmp_path / "smooth.mp4", fps=16))
    assert back.shape == frames.shape
    # Smooth content at crf 18: a couple of levels of error on average.
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3


def test_same_seed_same_video_other_seed_differs(t2v):
    profile = shape_profile("tiny", 5, config=t2v.config)
    a = t2v("a cat", seed=1, steps=1, profile=profile)
    b = t2v("a cat", seed=1, steps=1, profile=profile)
    c = t2v("a cat", seed=2, steps=1, profile=profile)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


def test_prompt_changes_the_video(t2v):
    profile = shape_profile("tiny", 5, config=t2v.config)
    a = t2v("a cat walks", seed=1, steps=1, profile=profile)
    b = t2v("the moon is bright", seed=1, steps=1, profile=profile)
    assert not torch.equal(a.latents, b.latents)


def test_tiny_i2v_conditions_on_the_image(tmp_path):
    pipe = ReferencePipeline.tiny("wan-tiny-i2v", workdir=tmp_path)
    profile = shape_profile("tiny", 9, config=pipe.config)
    image = np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    y = i2v_condition(pipe.vae, image, profile)
    assert y.shape == (1, 20, 3, 8, 16)
    assert torch.equal(y[:, :4, 0], torch.ones(1, 4, 8, 16)) and y[:, :4, 1:].abs().max() == 0
    video = pipe("a dog runs", seed=0, steps=4, profile=profile, image=image)
    assert video.frames.shape == (9, 64, 128, 3)
    with pytest.raises(ValueError, match="image-to-video"):
        pipe("a dog runs", profile=profile)


def test_frames_mapping_clamps_and_rounds():
    v = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=np.float32).reshape(1, 5, 1, 1)
    frames = latents_video_to_uint8(np.repeat(v, 3, axis=0))
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_write_mp4_refuses_bad_frames_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="even sizes"):
        write_mp4(np.zeros((2, 5, 6, 3), np.uint8), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 4, 6, 3), np.float32), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


def test_text_dim_mismatch_is_refused(t2v):
    with pytest.raises(ValueError, match="text_dim"):
        ReferencePipeline(get_config("wan2.1-t2v-1.3b"), t2v.dit, t2v.text_encoder, t2v.tokenizer, t2v.vae)
