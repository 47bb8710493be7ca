"""The sampler's Gaussian noise: Philox4x32-10 and Box-Muller, the same numbers in numpy and C++.

Bundles sample with this generator in the runtime (Python and C++) and in the PyTorch reference,
so all of them are compared on identical noise. (TurboDiffusion itself draws from a CUDA torch
generator; `turbotrt.models.sampler` can reproduce that where torch is available.)

Definition (GENERATOR, version 1):
- key = (seed mod 2^32, seed div 2^32) for a seed in [0, 2^64).
- Draw d (0 = the initial noise, then one per rCM step) fills a tensor of N values in row-major
  order, two values per Philox block: pair p (values 2p and 2p+1) comes from
  Philox4x32-10(counter = (p mod 2^32, p div 2^32, d, 0), key) = (x0, x1, x2, x3), uint32 each.
- Two uniforms in [0, 1) with 53 random bits: u1 = ((x0 >> 5) * 2^26 + (x1 >> 6)) * 2^-53, and
  u2 from (x2, x3) the same way.
- Box-Muller in float64: r = sqrt(-2 log(1 - u1)), a = 2 pi u2 (pi as the nearest float64);
  value 2p = float32(r cos a), value 2p+1 = float32(r sin a). An odd N drops the last sine.
Philox4x32-10 is Random123's (Salmon et al., SC'11): multipliers 0xD2511F53 and 0xCD9E8D57, key
increments 0x9E3779B9 and 0xBB67AE85, ten rounds.

The C++ runtime (`cpp/src/noise.cpp`) implements the same steps; the integer part is exact and the
float64 functions differ between math libraries by at most an ulp, which survives the rounding to
float32 only with probability ~1e-11 per value (the tests compare the two bit for bit).
"""

from __future__ import annotations

import numpy as np

GENERATOR = "philox4x32-10-boxmuller-f64"
VERSION = 1

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
MAX_SEED = 2**64 - 1


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Random123's Philox4x32-10 on counters `[..., 4]` (uint32) with one key: uint32 `[..., 4]`."""
    c = [np.asarray(counter[..., i], dtype=np.uint64) for i in range(4)]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0, p1 = _M0 * c[0], _M1 * c[2]  # 32x32 -> 64-bit products, exact in uint64
        hi0, lo0 = p0 >> _SHIFT32, p0 & _MASK32
        hi1, lo1 = p1 >> _SHIFT32, p1 & _MASK32
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack(c, axis=-1).astype(np.uint32)


def _uniform53(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a >> np.uint32(5)).astype(np.float64) * 67108864.0 + (b >> np.uint32(6)).astype(np.float64)) * 2.0**-53


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..2^64-1, got {seed!r}")
    return int(seed)


def normal(seed: int, draw: int, count: int) -> np.ndarray:
    """`count` float32 N(0, 1) values of draw `draw` of generator `seed` (see the module docstring)."""
    seed = check_seed(seed)
    pairs = (int(count) + 1) // 2
    p = np.arange(pairs, dtype=np.uint64)
    counter = np.empty((pairs, 4), dtype=np.uint32)
    counter[:, 0] = (p & _MASK32).astype(np.uint32)
    counter[:, 1] = (p >> _SHIFT32).astype(np.uint32)
    counter[:, 2] = np.uint32(draw)
    counter[:, 3] = 0
    x = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    u1, u2 = _uniform53(x[:, 0], x[:, 1]), _uniform53(x[:, 2], x[:, 3])
    r = np.sqrt(-2.0 * np.log(1.0 - u1))
    a = 2.0 * np.pi * u2
    out = np.empty((pairs, 2), dtype=np.float32)
    out[:, 0] = r * np.cos(a)
    out[:, 1] = r * np.sin(a)
    return out.reshape(-1)[:count]


class NoiseStream:
    """`NoiseStream(seed)(shape)` gives draw 0, the next call draw 1, and so on (sampling order)."""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self.draws = 0

    def __call__(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        out = normal(self.seed, self.draws, int(np.prod(shape, dtype=np.int64))).reshape(shape)
        self.draws += 1
        return out
