// The sampler's Gaussian noise: Philox4x32-10 and Box-Muller in float64, the generator of
// turbotrt/core/noise.py (GENERATOR "philox4x32-10-boxmuller-f64", version 1), value for value.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace turbotrt {

constexpr const char* NOISE_GENERATOR = "philox4x32-10-boxmuller-f64";
constexpr int NOISE_VERSION = 1;

// Random123's Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// `count` N(0, 1) float32 values of draw `draw` of generator `seed`, as noise.normal(seed, draw, count).
void normal(uint64_t seed, uint32_t draw, size_t count, float* out);

// NoiseStream(seed): draw 0 (the initial noise), then one draw per rCM step.
class NoiseStream {
 public:
  explicit NoiseStream(uint64_t seed) : seed_(seed) {}
  std::vector<float> operator()(size_t count) {
    std::vector<float> out(count);
    normal(seed_, draws_++, count, out.data());
    return out;
  }

 private:
  uint64_t seed_;
  uint32_t draws_ = 0;
};

}  // namespace turbotrt
