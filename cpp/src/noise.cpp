// Definition: turbotrt/core/noise.py's docstring. The integer part is exact; Box-Muller uses glibc's
// float64 log/cos/sin, which may differ from numpy's by an ulp, a difference that almost never
// survives the final rounding to float32 (the tests measure it).
#include "noise.hpp"

#include <cmath>

namespace turbotrt {

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> key) {
  const uint64_t M0 = 0xD2511F53, M1 = 0xCD9E8D57;
  const uint32_t W0 = 0x9E3779B9, W1 = 0xBB67AE85;
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += W0;
      k1 += W1;
    }
    uint64_t p0 = M0 * c[0], p1 = M1 * c[2];
    uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c = {hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0};
  }
  return c;
}

namespace {

// A uniform in [0, 1) with 53 random bits: 27 from a, 26 from b.
inline double uniform53(uint32_t a, uint32_t b) {
  return (double(a >> 5) * 67108864.0 + double(b >> 6)) * 0x1p-53;
}

}  // namespace

void normal(uint64_t seed, uint32_t draw, size_t count, float* out) {
  const std::array<uint32_t, 2> key{uint32_t(seed), uint32_t(seed >> 32)};
  const double pi = 3.141592653589793;  // numpy.pi, the float64 nearest to pi
  for (size_t p = 0; 2 * p < count; ++p) {
    auto x = philox4x32_10({uint32_t(p), uint32_t(uint64_t(p) >> 32), draw, 0}, key);
    double u1 = uniform53(x[0], x[1]), u2 = uniform53(x[2], x[3]);
    double r = std::sqrt(-2.0 * std::log(1.0 - u1));
    double a = 2.0 * pi * u2;
    out[2 * p] = float(r * std::cos(a));
    if (2 * p + 1 < count) out[2 * p + 1] = float(r * std::sin(a));
  }
}

}  // namespace turbotrt
