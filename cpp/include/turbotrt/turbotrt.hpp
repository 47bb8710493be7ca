// turbotrt's C++ runtime: run a bundle (the folder `turbotrt export` writes) exactly as the Python
// runtime (`turbotrt run`, turbotrt/runtime/pipeline.py) does.
//
//     auto pipe = turbotrt::Pipeline::load("wan-bundle");
//     turbotrt::Result r = pipe("a red bird flies over a river at night", /*seed=*/0, /*steps=*/4);
//     // r.frames.rgb: uint8 [T, H, W, 3]; r.latents.values: float [1, 16, T_lat, h, w]
//
// The same prompt, seed and steps give the same latents and frames as Python: the same tokenizer,
// the same float64 rCM schedule and updates, the same Philox noise (turbotrt/core/noise.py).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace turbotrt {

// Every expected failure (a bad or tampered bundle, bad input, a missing backend) is an Error whose
// message is one line naming the problem and the fix; the messages of bundle refusals are those of
// the Python runtime, word for word.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The one static shape the bundle was exported for.
struct Profile {
  std::string name;        // "480p-16x9-81f"
  std::string resolution;  // "480p"
  std::string aspect;      // "16:9"
  int width = 0, height = 0, frames = 0, batch = 1;
  std::vector<int64_t> latent_shape;  // [batch, channels, T_lat, height / 8, width / 8]
};

// An RGB image, row-major [height, width, 3]: the first frame of an image-to-video bundle.
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

struct Frames {
  int count = 0, height = 0, width = 0;
  std::vector<uint8_t> rgb;  // uint8 [count, height, width, 3]
};

struct Latents {
  std::vector<int64_t> shape;  // [1, 16, T_lat, h, w]
  std::vector<float> values;
};

struct Result {
  Frames frames;
  Latents latents;
  std::vector<std::pair<std::string, double>> timings;  // stage -> seconds, in order
  int fps = 16;                                         // Wan's frame rate
};

struct LoadOptions {
  std::string backend = "auto";  // "auto": TensorRT engines for this GPU when present, else ONNX Runtime
  bool verify = true;            // hash every file and the manifest's own digest (slow for large bundles)
  std::function<void(const std::string&)> log;  // where "backend: ..." goes (default: stderr)
};

class Pipeline {
 public:
  // Parse and check the bundle exactly as Python's Bundle.load does, load the tokenizer and pick
  // the backend. Throws Error.
  static Pipeline load(const std::string& bundle_dir, const LoadOptions& options = {});

  // Text-to-video. seed: 0 .. 2^64-1; steps: 1 .. 4.
  Result operator()(const std::string& prompt, uint64_t seed = 0, int steps = 4);
  // Image-to-video bundles take the first frame (at the profile's size); ode: deterministic Euler
  // steps instead of rCM's stochastic ones.
  Result operator()(const std::string& prompt, uint64_t seed, int steps, const Image* image, bool ode = false);

  const Profile& profile() const;
  const std::string& model() const;  // the preset's name, "wan2.1-t2v-1.3b"
  bool is_i2v() const;
  std::string backend() const;  // "ONNX Runtime (CPUExecutionProvider)"

  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  ~Pipeline();

  struct Impl;

 private:
  explicit Pipeline(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace turbotrt
