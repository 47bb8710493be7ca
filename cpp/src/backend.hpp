// Backends that run one graph of a bundle (turbotrt/runtime/backends.py): a network name gives a
// Session whose run(feeds) takes and gives host tensors by name. Sessions are made on first use.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "bundle.hpp"
#include "tensor.hpp"

namespace turbotrt {

using Feeds = std::map<std::string, const Tensor*>;
using Outputs = std::map<std::string, Tensor>;

class Session {
 public:
  virtual ~Session() = default;
  // Every input of the graph must be in feeds (others are ignored); returns every output.
  virtual Outputs run(const Feeds& feeds) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Session& session(const std::string& network) = 0;
  virtual std::string describe() const = 0;
};

using Log = std::function<void(const std::string&)>;

// name: "ort", "trt" or "auto" (TensorRT when it is compiled in and the bundle has engines for this
// GPU and TensorRT version, else ONNX Runtime; says which, and why, through log).
std::unique_ptr<Backend> make_backend(const Bundle& bundle, const std::string& name, const Log& log);

std::unique_ptr<Backend> make_ort_backend(const Bundle& bundle);
#ifdef TURBOTRT_WITH_TENSORRT
// require_all_engines: throw Error now unless every graph has an engine for this GPU and TensorRT
// (otherwise a missing engine is reported when its graph first runs).
std::unique_ptr<Backend> make_trt_backend(const Bundle& bundle, bool require_all_engines);
#endif

}  // namespace turbotrt
