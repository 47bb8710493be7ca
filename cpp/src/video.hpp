// Decoder output to frames, as turbotrt/core/video.py's latents_video_to_uint8.
#pragma once

#include "tensor.hpp"
#include "turbotrt/turbotrt.hpp"

namespace turbotrt {

// float32 video [1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3]: clamp to [-1, 1], map to
// [0, 1], scale by 255 and round half to even, in float32 as numpy computes it.
Frames video_to_frames(const Tensor& video);

}  // namespace turbotrt
