"""The bundles' noise generator: Philox4x32-10 (Random123's known answers) and Box-Muller in float64."""

import math

import numpy as np
import pytest

from turbotrt.core.noise import MAX_SEED, NoiseStream, normal, philox4x32_10


@pytest.mark.parametrize("counter,key,expected", [
    # Random123's kat_vectors for philox4x32_10 (zero, all-ones, and pi's digits).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(np.array([counter], np.uint32), key)
    assert tuple(int(v) for v in out[0]) == expected


def test_box_muller_from_the_first_block():
    # Seed 0, draw 0, pair 0 is the all-zero counter's block above: the transform written out by hand.
    x = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    u1 = ((x[0] >> 5) * 2**26 + (x[1] >> 6)) / 2**53
    u2 = ((x[2] >> 5) * 2**26 + (x[3] >> 6)) / 2**53
    r = math.sqrt(-2 * math.log(1 - u1))
    want = np.array([r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)], np.float32)
    np.testing.assert_array_equal(normal(0, 0, 2), want)


def test_draws_are_standard_normal_and_independent():
    a, b = normal(7, 0, 200_000), normal(7, 1, 200_000)
    for z in (a, b):
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
        assert abs(np.mean(z**4) - 3) < 0.1  # Gaussian kurtosis
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
    assert abs(np.corrcoef(a[0::2], a[1::2])[0, 1]) < 0.01  # the cosine and sine of one pair
    assert not np.array_equal(normal(8, 0, 16), normal(7, 0, 16))


def test_counter_based_prefixes_and_stream_order():
    assert np.array_equal(normal(3, 2, 5), normal(3, 2, 6)[:5])  # an odd count drops the last sine only
    s = NoiseStream(3)
    first, second = s((2, 3)), s((4,))
    assert np.array_equal(first.ravel(), normal(3, 0, 6)) and np.array_equal(second, normal(3, 1, 4))
    assert first.dtype == np.float32 and first.shape == (2, 3)


def test_seeds_span_64_bits_and_nothing_else():
    assert not np.array_equal(normal(MAX_SEED, 0, 4), normal(MAX_SEED - 2**32, 0, 4))  # the key's high word counts
    for bad in (-1, MAX_SEED + 1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed must be an integer in 0..2\\^64-1"):
            NoiseStream(bad)
