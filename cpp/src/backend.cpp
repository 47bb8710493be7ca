// make_backend: the choice turbotrt/runtime/backends.py's make_backend makes, with the same log line.
#include "backend.hpp"

namespace turbotrt {

std::unique_ptr<Backend> make_backend(const Bundle& bundle, const std::string& name, const Log& log) {
  if (name != "auto" && name != "ort" && name != "trt")
    throw Error("unknown backend '" + name + "'; choose from auto, ort, trt");
  if (name == "ort") return make_ort_backend(bundle);
#ifdef TURBOTRT_WITH_TENSORRT
  if (name == "trt") return make_trt_backend(bundle, false);
  try {
    auto backend = make_trt_backend(bundle, true);
    log("backend: " + backend->describe());
    return backend;
  } catch (const Error& e) {
    auto backend = make_ort_backend(bundle);
    log("backend: " + backend->describe() + " (TensorRT not used: " + e.what() + ")");
    return backend;
  }
#else
  const std::string why = "this build of turbotrt has no TensorRT backend (configure with -DTURBOTRT_WITH_TENSORRT=ON)";
  if (name == "trt") throw Error(why + "; use --backend ort");
  auto backend = make_ort_backend(bundle);
  log("backend: " + backend->describe() + " (TensorRT not used: " + why + ")");
  return backend;
#endif
}

}  // namespace turbotrt
