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
