// The example's file formats: videos (mp4 through FFmpeg's libraries, or y4m without them), the I2V
// first frame (any image FFmpeg decodes, or binary PPM), and .npy arrays. Every file is written to a
// temp name beside the target and renamed into place.
#pragma once

#include <string>

#include "turbotrt/turbotrt.hpp"

namespace media {

bool have_ffmpeg();
// FFmpeg's own messages: errors only.
void quiet_ffmpeg();
// H.264 (libx264, crf 18, yuv420p) in mp4, as the Python runtime's write_mp4 encodes it.
void write_mp4(const turbotrt::Frames& frames, int fps, const std::string& path);
// YUV4MPEG2, 4:4:4, BT.601 limited range: `ffmpeg -i video.y4m video.mp4` converts it.
void write_y4m(const turbotrt::Frames& frames, int fps, const std::string& path);
// The first frame of an image or video file as RGB (FFmpeg), or a binary PPM (P6) without FFmpeg.
turbotrt::Image read_image(const std::string& path);
void write_npy_u8(const turbotrt::Frames& frames, const std::string& path);
void write_npy_f32(const turbotrt::Latents& latents, const std::string& path);

}  // namespace media
