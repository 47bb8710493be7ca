// turbotrt_run: the C++ counterpart of `turbotrt run`. Prompt (and, for I2V, the first frame) in,
// video out: the same frames as the Python runtime for the same bundle, prompt, seed and steps.
//
//   turbotrt_run BUNDLE --prompt TEXT [--out video.mp4|video.y4m] [--steps 4] [--seed 0]
//                [--image first.png] [--ode] [--backend auto|ort|trt] [--no-verify]
//                [--save-latents latents.npy] [--save-frames frames.npy]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "media.hpp"
#include "turbotrt/turbotrt.hpp"

namespace {

const char* USAGE =
    "usage: turbotrt_run BUNDLE --prompt TEXT [--out video.mp4|video.y4m] [--steps 1-4] [--seed N] [--image FILE]\n"
    "                    [--ode] [--backend auto|ort|trt] [--no-verify] [--save-latents FILE.npy] [--save-frames FILE.npy]\n";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

uint64_t parse_seed(const std::string& s) {
  // Python's check_seed: an integer in 0..2^64-1.
  char* end = nullptr;
  errno = 0;
  unsigned long long v = s.empty() || s[0] == '-' ? 0 : std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || s[0] == '-' || !end || *end || errno)
    throw turbotrt::Error("seed must be an integer in 0..2^64-1, got " + s);
  return v;
}

int parse_steps(const std::string& s) {
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end || v < 1 || v > 4) throw turbotrt::Error("--steps: " + s + " is not in the range 1<=x<=4");
  return int(v);
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle, prompt, out = "video.mp4", image_path, backend = "auto", latents_path, frames_path;
  bool have_prompt = false, ode = false, verify = true;
  uint64_t seed = 0;
  int steps = 4;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw turbotrt::Error("option " + a + " needs a value");
        return argv[++i];
      };
      if (a == "-h" || a == "--help") {
        std::cout << USAGE;
        return 0;
      } else if (a == "--prompt") {
        prompt = value();
        have_prompt = true;
      } else if (a == "--out") out = value();
      else if (a == "--steps") steps = parse_steps(value());
      else if (a == "--seed") seed = parse_seed(value());
      else if (a == "--image") image_path = value();
      else if (a == "--ode") ode = true;
      else if (a == "--backend") backend = value();
      else if (a == "--no-verify") verify = false;
      else if (a == "--verify") verify = true;
      else if (a == "--save-latents") latents_path = value();
      else if (a == "--save-frames") frames_path = value();
      else if (!a.empty() && a[0] == '-') throw turbotrt::Error("no such option: " + a);
      else if (bundle.empty()) bundle = a;
      else throw turbotrt::Error("unexpected argument " + a);
    }
    if (bundle.empty() || !have_prompt) {
      std::cerr << USAGE;
      throw turbotrt::Error(bundle.empty() ? "missing argument BUNDLE" : "missing option --prompt");
    }
    if (!ends_with(out, ".mp4") && !ends_with(out, ".y4m")) throw turbotrt::Error("--out: write a .mp4 or a .y4m file, not " + out);

    media::quiet_ffmpeg();
    auto start = std::chrono::steady_clock::now();
    turbotrt::LoadOptions options;
    options.backend = backend;
    options.verify = verify;
    options.log = [](const std::string& line) { std::cout << line << std::endl; };
    auto pipe = turbotrt::Pipeline::load(bundle, options);
    turbotrt::Image image;
    if (!image_path.empty()) image = media::read_image(image_path);
    turbotrt::Result r = pipe(prompt, seed, steps, image_path.empty() ? nullptr : &image, ode);

    if (ends_with(out, ".mp4")) media::write_mp4(r.frames, r.fps, out);
    else media::write_y4m(r.frames, r.fps, out);
    if (!latents_path.empty()) media::write_npy_f32(r.latents, latents_path);
    if (!frames_path.empty()) media::write_npy_u8(r.frames, frames_path);

    double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string stages;
    for (const auto& [name, secs] : r.timings) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s%s %.2f s", stages.empty() ? "" : ", ", name.c_str(), secs);
      stages += buf;
    }
    std::printf("wrote %s: %d frames %dx%d, %d steps, seed %llu (%.1f s; %s)\n", out.c_str(), r.frames.count, r.frames.width,
                r.frames.height, steps, static_cast<unsigned long long>(seed), total, stages.c_str());
    return 0;
  } catch (const turbotrt::Error& e) {
    std::cerr << "Error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "Error: unexpected failure: " << e.what() << "\n";
    return 2;
  }
}
