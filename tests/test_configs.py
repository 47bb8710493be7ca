import pytest

from turbotrt.core.configs import PRESETS, default_profile, get_config, list_configs, shape_profile, validate_frames


def test_presets_listed_and_named():
    assert {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-i2v-a14b", "wan-tiny", "wan-tiny-i2v"} <= set(list_configs())
    assert get_config("wan2.1-t2v-1.3b").head_dim == 128
    i2v = get_config("wan2.2-i2v-a14b")
    assert (i2v.in_dim, i2v.experts, i2v.boundary, i2v.sigma_max) == (36, ("high", "low"), 0.9, 200.0)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="wan2.1-t2v-1.3b"):
        get_config("wan3")


@pytest.mark.parametrize("res,aspect,seq_len", [("480p", "16:9", 32760), ("720p", "16:9", 75600)])
def test_real_token_counts(res, aspect, seq_len):
    p = shape_profile(res, 81, aspect)
    assert p.latent_shape() == (16, 21, p.height // 8, p.width // 8)
    assert p.seq_len() == seq_len


def test_frames_must_be_4k_plus_1():
    assert validate_frames(81) == 81
    for bad in (80, 0, 2, 129):
        with pytest.raises(ValueError, match="4k\\+1"):
            validate_frames(bad)


def test_resolution_must_be_supported_by_the_model():
    with pytest.raises(ValueError, match="supports resolutions 480p"):
        shape_profile("720p", 81, config=get_config("wan2.1-t2v-1.3b"))
    with pytest.raises(ValueError, match="aspect ratios"):
        shape_profile("480p", 81, "4:3")
    with pytest.raises(ValueError, match="unknown resolution"):
        shape_profile("1080p", 81)


def test_every_preset_has_a_valid_default_profile():
    for c in PRESETS.values():
        p = default_profile(c)
        assert p.seq_len() > 0 and p.frames == c.default_frames
