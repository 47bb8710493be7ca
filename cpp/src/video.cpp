#include "video.hpp"

#include <cmath>

namespace turbotrt {

Frames video_to_frames(const Tensor& video) {
  if (video.dtype != DType::float32 || video.shape.size() != 5 || video.shape[0] != 1 || video.shape[1] != 3)
    throw Error("expected a float32 video [1, 3, T, H, W], got " + video.describe());
  Frames f;
  f.count = int(video.shape[2]);
  f.height = int(video.shape[3]);
  f.width = int(video.shape[4]);
  const size_t plane = size_t(f.count) * size_t(f.height) * size_t(f.width);
  f.rgb.resize(plane * 3);
  const float* v = video.data<float>();
  for (size_t c = 0; c < 3; ++c)
    for (size_t i = 0; i < plane; ++i) {
      float x = v[c * plane + i];
      // np.clip keeps NaN, and numpy's float -> uint8 cast of NaN gives 0 on x86-64.
      if (std::isnan(x)) {
        f.rgb[i * 3 + c] = 0;
        continue;
      }
      x = x < -1.0f ? -1.0f : x > 1.0f ? 1.0f : x;
      x = (x + 1.0f) / 2.0f;
      f.rgb[i * 3 + c] = uint8_t(std::nearbyint(x * 255.0f));  // round half to even, as np.round
    }
  return f;
}

}  // namespace turbotrt
