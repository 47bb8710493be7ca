"""The toy captioned-video set, its prompt-following score, and the trained toy model."""

import numpy as np
import pytest

from turbotrt.toy.dataset import CAPTIONS, COLOURS, DIRECTIONS, SHAPES, ToyVideos, parse_caption, render
from turbotrt.toy.score import score_grid, score_video


def test_captions_cover_every_colour_shape_direction():
    assert len(CAPTIONS) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) == len(set(CAPTIONS))
    assert str(parse_caption("a  Red circle moves right ")) == "a red circle moves right"
    with pytest.raises(ValueError, match="not a caption of the toy set.*yellow"):
        parse_caption("a purple circle moves right")


def test_dataset_is_deterministic_and_well_formed():
    a, cap_a = ToyVideos(seed=3)[5]
    b, cap_b = ToyVideos(seed=3)[5]
    assert cap_a == cap_b and np.array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == (17, 64, 128, 3)
    assert not np.array_equal(ToyVideos(seed=4)[5][0], a)  # another seed, another video
    videos, captions = ToyVideos(seed=3).batch(0, 6)
    assert videos.shape == (6, 17, 64, 128, 3) and len(captions) == 6


def test_spread_narrows_the_start_positions():
    from turbotrt.toy.dataset import ToyConfig

    one_track = [render("a blue circle moves up", np.random.default_rng(s), ToyConfig(spread=0.0)) for s in (0, 1)]
    assert np.array_equal(*one_track)
    anywhere = [render("a blue circle moves up", np.random.default_rng(s)) for s in (0, 1)]
    assert not np.array_equal(*anywhere)


def test_every_dataset_video_follows_its_caption():
    result = score_grid(lambda c, s: render(c, np.random.default_rng(s)), CAPTIONS, seeds=(0, 1))
    assert result["videos"] == 2 * len(CAPTIONS)
    assert result["pass_rate"] == 1.0


@pytest.mark.parametrize("wrong", ["a blue circle moves right", "a red circle moves left", "a red circle moves up"])
def test_a_wrong_caption_fails(wrong):
    video = render("a red circle moves right", np.random.default_rng(0))
    assert score_video(video, "a red circle moves right").passed
    s = score_video(video, wrong)
    assert not s.passed
    assert s.colour == "red" and s.direction == "right"


def test_still_blank_and_noise_videos_fail():
    video = render("a green square moves down", np.random.default_rng(1))
    still = np.repeat(video[:1], len(video), axis=0)
    s = score_video(still, "a green square moves down")
    assert s.colour_ok and not s.direction_ok
    blank = np.full_like(video, 30)
    assert not score_video(blank, "a green square moves down").passed
    noise = np.random.default_rng(0).integers(0, 256, video.shape, dtype=np.uint8)
    assert not score_grid(lambda c, s: noise, CAPTIONS[:8], seeds=(0,))["pass_rate"] > 0.25


# --- the trained toy model shipped with the package ---------------------------------------------

# The demo's default prompt and a few others that between them cover every colour and direction.
PROMPTS = ("a red circle moves right", "a blue square moves up", "a green triangle moves left",
           "a yellow circle moves down")


def test_shipped_weights_load_through_the_checkpoint_code():
    from turbotrt.models.checkpoint import inspect_checkpoint, load_wan
    from turbotrt.models.t5 import load_t5, random_t5_state_dict
    from turbotrt.models.vae import load_vae, random_vae_state_dict
    from turbotrt.models.wan import random_wan_state_dict
    from turbotrt.toy.model import weight_paths

    p = weight_paths()
    info = inspect_checkpoint(p["dit"])
    assert info["preset"] == "wan-tiny" and info["problems"] == [] and info["quantization"] == "none"
    dit = load_wan(p["dit"])  # preset detected from the shapes, every key checked (strict)
    vae = load_vae(p["vae"])
    t5 = load_t5(p["text_encoder"])
    assert (dit.config.name, vae.config.name, t5.cfg.name) == ("wan-tiny", "wan-vae-tiny", "umt5-tiny")
    # Trained, not the seeded random weights of the tiny presets (umT5 starts from them, then trains).
    rand = random_wan_state_dict(dit.config, seed=0, dtype="fp32")
    assert not torch_equal(dit.state_dict()["blocks.0.ffn.0.weight"], rand["blocks.0.ffn.0.weight"])
    rand_vae = random_vae_state_dict("wan-vae-tiny", 0)
    assert not torch_equal(vae.state_dict()["decoder.head.2.weight"], rand_vae["decoder.head.2.weight"])
    rand_t5 = random_t5_state_dict("umt5-tiny", 0)
    assert not torch_equal(t5.state_dict()["token_embedding.weight"], rand_t5["token_embedding.weight"])


def torch_equal(a, b) -> bool:
    return bool((a.float() == b.float()).all())


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    """The toy model exported as the demo exports it (SageSLA, fp32)."""
    from turbotrt.toy.model import export_toy

    out = tmp_path_factory.mktemp("toy") / "bundle"
    export_toy(out, precision="fp32", attention="sagesla", validate=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def toy_pipeline(toy_bundle):
    """The toy bundle run by the torch-free runtime (ONNX Runtime)."""
    from turbotrt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(toy_bundle, backend="ort", log=lambda *_: None)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_toy_bundle_follows_the_prompt(toy_pipeline, prompt):
    video = toy_pipeline(prompt, seed=0, steps=4)
    s = score_video(video.frames, prompt)
    assert s.passed, s


def test_int8_toy_bundle_keeps_the_prompt_following(toy_bundle, toy_pipeline, tmp_path):
    """Stated drop: none on these prompts. benchmarks/toy_quality.py measures INT8 latents within
    ~0.03 (mean absolute) of float, a tenth of what changes a verdict."""
    from turbotrt.calibration.api import calibrate
    from turbotrt.runtime.pipeline import Pipeline

    calibrate(toy_bundle, tmp_path / "int8", mode="int8", observer="max", prompts=CAPTIONS[1::12], steps=4,
              seeds=(100,), evaluate=False, log=lambda *_: None)
    pipe = Pipeline.from_bundle(tmp_path / "int8", backend="ort", log=lambda *_: None)
    for prompt in PROMPTS[:2]:
        video = pipe(prompt, seed=0, steps=4)
        assert score_video(video.frames, prompt).passed, prompt
        float_latents = toy_pipeline(prompt, seed=0, steps=4).latents
        assert 0 < np.abs(video.latents - float_latents).mean() < 0.1  # quantized, and close


def test_demo_rejects_a_prompt_outside_the_toy_set(tmp_path):
    from click.testing import CliRunner

    from turbotrt.cli import main

    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--prompt", "a cat walks"])
    assert r.exit_code == 2 and "not a caption of the toy set" in r.output
    assert not (tmp_path / "turbotrt-demo-bundle").exists()
