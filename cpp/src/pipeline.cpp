// The pipeline of turbotrt/runtime/pipeline.py, step for step: tokenize -> text encoder -> float64
// rCM loop over the DiT (the expert switch for I2V) -> VAE decode graphs one latent frame at a time,
// their caches fed back; for I2V the image is encoded first into y = cat(mask, z).
#include <chrono>
#include <cstring>
#include <iostream>

#include "backend.hpp"
#include "bundle.hpp"
#include "noise.hpp"
#include "rcm.hpp"
#include "tokenizer.hpp"
#include "turbotrt/turbotrt.hpp"
#include "video.hpp"

namespace turbotrt {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant) {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while (!(mant & 0x400));
    bits = sign | (uint32_t(112 - e) << 23) | ((mant & 0x3FF) << 13);
  } else {
    bits = sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A float graph output as float64, as numpy's .astype(np.float64).
std::vector<double> to_double(const Tensor& t) {
  std::vector<double> out(t.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    switch (t.dtype) {
      case DType::float32: out[i] = t.data<float>()[i]; break;
      case DType::float16: out[i] = half_to_float(t.data<uint16_t>()[i]); break;
      case DType::bfloat16: {
        uint32_t bits = uint32_t(t.data<uint16_t>()[i]) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        out[i] = f;
        break;
      }
      default: throw Error("expected a float tensor, got " + t.describe());
    }
  }
  return out;
}

Tensor take(Outputs& outputs, const std::string& name, const std::string& network) {
  auto it = outputs.find(name);
  if (it == outputs.end()) throw Error("the " + network + " graph has no output " + name + "; export the bundle again");
  return std::move(it->second);
}

// The cache_out.* outputs of a VAE step, renamed to the cache_in.* inputs of the next call.
std::map<std::string, Tensor> next_caches(Outputs& outputs) {
  std::map<std::string, Tensor> caches;
  for (auto& [name, t] : outputs)
    if (name.rfind("cache_out.", 0) == 0) caches.emplace("cache_in." + name.substr(10), std::move(t));
  return caches;
}

Tensor ints(const std::vector<int64_t>& values, const IOSpec* spec, const std::string& what) {
  std::vector<int64_t> shape{1, int64_t(values.size())};
  if (spec && spec->dtype == "int64") {
    Tensor t(DType::int64, shape);
    std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
    return t;
  }
  if (spec && spec->dtype != "int32") throw Error("the text encoder's " + what + " is " + spec->dtype + ", not int32 or int64");
  Tensor t(DType::int32, shape);  // what the Python runtime feeds
  for (size_t i = 0; i < values.size(); ++i) t.data<int32_t>()[i] = int32_t(values[i]);
  return t;
}

}  // namespace

struct Pipeline::Impl {
  Bundle bundle;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Backend> backend;
  Log log;

  std::string dit(double t_cur) const {
    const auto& m = bundle.manifest.model;
    std::string expert = expert_for_step(t_cur, m.boundary.value_or(0.0), m.experts);
    return expert.empty() ? "dit" : "dit_" + expert;
  }

  Tensor encode_prompt(const std::string& prompt) {
    if (cleaning_is_approximate(prompt))
      log("warning: the prompt has HTML entities or Latin-1 characters, which the C++ tokenizer cleans like Python's "
          "ftfy only in common cases; compare with `turbotrt run` if the video must match");
    std::vector<int64_t> ids, mask;
    (*tokenizer)(prompt, ids, mask);
    const GraphSpec& spec = bundle.spec("text_encoder");
    Tensor ids_t = ints(ids, spec.input("ids"), "ids"), mask_t = ints(mask, spec.input("mask"), "mask");
    Outputs out = backend->session("text_encoder").run({{"ids", &ids_t}, {"mask", &mask_t}});
    return take(out, "context", "text_encoder");
  }

  Tensor sample(const Tensor& context, uint64_t seed, int steps, const Tensor* y, bool ode,
                std::vector<std::pair<std::string, double>>& timings) {
    const auto& m = bundle.manifest.model;
    std::vector<double> times = rcm_times(steps, m.sigma_max);
    std::vector<float> net_t = net_timesteps(times);
    const IOSpec* x_spec = bundle.spec(dit(times[0])).input("x");
    if (!x_spec) throw Error("the " + dit(times[0]) + " graph has no input x; export the bundle again");
    const std::vector<int64_t> shape = x_spec->shape;
    const size_t n = numel(shape);
    NoiseStream noise(seed);
    std::vector<float> first = noise(n);
    std::vector<double> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = double(first[i]) * times[0];
    Tensor x32(DType::float32, shape), t_freq(DType::float32, {shape[0], m.freq_dim});
    for (int i = 0; i < steps; ++i) {
      auto t0 = Clock::now();
      const double t_cur = times[size_t(i)], t_next = times[size_t(i) + 1];
      for (size_t k = 0; k < n; ++k) x32.data<float>()[k] = float(x[k]);
      std::vector<float> sinusoid = timestep_sinusoid(net_t[size_t(i)], int(m.freq_dim));
      for (int64_t b = 0; b < shape[0]; ++b)
        std::memcpy(t_freq.data<float>() + b * m.freq_dim, sinusoid.data(), sinusoid.size() * sizeof(float));
      Feeds feeds{{"x", &x32}, {"context", &context}, {"t_freq", &t_freq}};
      if (y) feeds["y"] = y;
      const std::string network = dit(t_cur);
      Outputs out = backend->session(network).run(feeds);
      std::vector<double> v = to_double(take(out, "velocity", network));
      if (v.size() != n) throw Error("the " + network + " graph's velocity has the wrong size; export the bundle again");
      if (ode) {
        const double dt = t_cur - t_next;  // ode_step: x - (t_cur - t_next) * v
        for (size_t k = 0; k < n; ++k) x[k] = x[k] - dt * v[k];
      } else {
        // sde_step: (1 - t_next) * (x - t_cur * v) + t_next * noise, one float64 rounding per
        // operation in numpy's order (the build turns off FMA contraction).
        std::vector<float> fresh = noise(n);
        const double keep = 1.0 - t_next;
        for (size_t k = 0; k < n; ++k) {
          double clean = x[k] - t_cur * v[k];
          x[k] = keep * clean + t_next * double(fresh[k]);
        }
      }
      timings.emplace_back("step_" + std::to_string(i), seconds_since(t0));
    }
    Tensor latents(DType::float32, shape);
    for (size_t k = 0; k < n; ++k) latents.data<float>()[k] = float(x[k]);
    return latents;
  }

  Tensor decode(const Tensor& latents) {
    Tensor z0 = slice_axis2(latents, 0);
    Outputs first = backend->session("vae_decode_first").run({{"z", &z0}});
    std::vector<Tensor> videos;
    videos.push_back(take(first, "video", "vae_decode_first"));
    auto cache = next_caches(first);
    for (int64_t t = 1; t < latents.shape[2]; ++t) {
      Tensor z = slice_axis2(latents, t);
      Feeds feeds{{"z", &z}};
      for (const auto& [name, c] : cache) feeds[name] = &c;
      Outputs out = backend->session("vae_decode_step").run(feeds);
      videos.push_back(take(out, "video", "vae_decode_step"));
      cache = next_caches(out);
    }
    std::vector<const Tensor*> parts;
    for (const auto& v : videos) parts.push_back(&v);
    return concatenate(parts, 2);
  }

  Tensor encode_image(const Image& image) {
    const Profile& p = bundle.manifest.profile;
    const int h = p.height, w = p.width;
    if (image.height != h || image.width != w || image.rgb.size() != size_t(h) * size_t(w) * 3)
      throw Error("the bundle was exported for " + std::to_string(w) + "x" + std::to_string(h) + ": pass a uint8 [" +
                  std::to_string(h) + ", " + std::to_string(w) + ", 3] image (got uint8 (" + std::to_string(image.height) +
                  ", " + std::to_string(image.width) + ", 3)); resize it first");
    // (image / 127.5 - 1) in float32, HWC -> [1, 3, 1, H, W]
    Tensor x0(DType::float32, {1, 3, 1, h, w});
    const size_t plane = size_t(h) * size_t(w);
    for (size_t c = 0; c < 3; ++c)
      for (size_t i = 0; i < plane; ++i) x0.data<float>()[c * plane + i] = float(image.rgb[i * 3 + c]) / 127.5f - 1.0f;
    Outputs first = backend->session("vae_encode_first").run({{"video", &x0}});
    std::vector<Tensor> zs;
    zs.push_back(take(first, "z", "vae_encode_first"));
    auto cache = next_caches(first);
    Tensor zeros(DType::float32, {1, 3, 4, h, w});
    for (int k = 0; k < (p.frames - 1) / 4; ++k) {
      Feeds feeds{{"video", &zeros}};
      for (const auto& [name, c] : cache) feeds[name] = &c;
      Outputs out = backend->session("vae_encode_step").run(feeds);
      zs.push_back(take(out, "z", "vae_encode_step"));
      cache = next_caches(out);
    }
    std::vector<const Tensor*> parts;
    for (const auto& z : zs) parts.push_back(&z);
    Tensor z = concatenate(parts, 2);
    if (z.dtype != DType::float32) throw Error("the VAE encoder gives " + z.describe() + ", not float32; export the bundle again");
    // mask [1, 4, T, h, w]: 1 on the first latent frame (the given image), 0 after
    Tensor mask(DType::float32, {1, 4, z.shape[2], z.shape[3], z.shape[4]});
    const size_t frame = size_t(z.shape[3] * z.shape[4]);
    for (int64_t c = 0; c < 4; ++c)
      for (size_t i = 0; i < frame; ++i) mask.data<float>()[size_t(c * z.shape[2]) * frame + i] = 1.0f;
    return concatenate({&mask, &z}, 1);
  }
};

Pipeline::Pipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&&) noexcept = default;
Pipeline::~Pipeline() = default;

Pipeline Pipeline::load(const std::string& bundle_dir, const LoadOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->log = options.log ? options.log : Log([](const std::string& line) { std::cerr << line << "\n"; });
  impl->bundle = Bundle::load(bundle_dir, options.verify);
  impl->tokenizer = std::make_unique<Tokenizer>(impl->bundle.tokenizer(), impl->bundle.manifest.model.text_len);
  impl->backend = make_backend(impl->bundle, options.backend, impl->log);
  return Pipeline(std::move(impl));
}

Result Pipeline::operator()(const std::string& prompt, uint64_t seed, int steps) {
  return (*this)(prompt, seed, steps, nullptr, false);
}

Result Pipeline::operator()(const std::string& prompt, uint64_t seed, int steps, const Image* image, bool ode) {
  Impl& p = *impl_;
  const auto& model = p.bundle.manifest.model;
  if (model.is_i2v() && !image) throw Error(model.name + " is image-to-video: pass an image");
  if (!model.is_i2v() && image) throw Error(model.name + " is text-to-video: it takes no image");
  validate_steps(steps);
  Result result;
  auto t0 = Clock::now();
  Tensor context = p.encode_prompt(prompt);
  result.timings.emplace_back("text", seconds_since(t0));
  Tensor y;
  if (image) {
    t0 = Clock::now();
    y = p.encode_image(*image);
    result.timings.emplace_back("image", seconds_since(t0));
  }
  Tensor latents = p.sample(context, seed, steps, image ? &y : nullptr, ode, result.timings);
  t0 = Clock::now();
  Tensor video = p.decode(latents);
  result.timings.emplace_back("vae", seconds_since(t0));
  result.frames = video_to_frames(video);
  result.latents.shape = latents.shape;
  result.latents.values.assign(latents.data<float>(), latents.data<float>() + latents.numel());
  return result;
}

const Profile& Pipeline::profile() const { return impl_->bundle.manifest.profile; }
const std::string& Pipeline::model() const { return impl_->bundle.manifest.model.name; }
bool Pipeline::is_i2v() const { return impl_->bundle.manifest.model.is_i2v(); }
std::string Pipeline::backend() const { return impl_->backend->describe(); }

}  // namespace turbotrt
