// TensorRT through its C++ runtime API (TensorRT >= 10.9; NvInferRuntime.h): IRuntime deserializes
// the bundle's plan for this GPU and TensorRT version, IExecutionContext::enqueueV3 runs it. Engines
// with SageSLA carry the plugin's ahead-of-time compiled kernel (tensorrt.plugin.aot_impl), so plain
// libnvinfer runs them: nothing is registered here and no Python is involved.
//
// Compiled only with -DTURBOTRT_WITH_TENSORRT=ON. Every I/O tensor has a static shape (the bundle's
// profile); each graph call copies the inputs to device buffers allocated once per engine, runs on
// one stream and copies the outputs back, as the Python runtime's Polygraphy runner does.
#ifdef TURBOTRT_WITH_TENSORRT

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <iostream>
#include <map>
#include <memory>

#include "backend.hpp"
#include "files.hpp"

namespace turbotrt {

namespace {

void cuda_check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw Error("CUDA failed to " + what + ": " + cudaGetErrorString(err));
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kERROR) std::cerr << "TensorRT: " << msg << "\n";
  }
};

Logger& logger() {
  static Logger l;  // outlives every runtime, as TensorRT requires
  return l;
}

// "sm_89": what the bundle's engine entries name (Python asks nvidia-smi for the same number).
std::string compute_capability() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    throw Error("the TensorRT backend needs an NVIDIA GPU; none was found (use --backend ort)");
  int device = 0, major = 0, minor = 0;
  cuda_check(cudaGetDevice(&device), "select a GPU");
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "query the GPU");
  cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "query the GPU");
  return "sm_" + std::to_string(major) + std::to_string(minor);
}

// The loaded library's version as Python's tensorrt.__version__ spells it ("10.9.0.34"). The library
// reports major.minor.patch; the build number comes from the headers when they are the same release.
std::string library_version() {
  const int32_t v = getInferLibVersion();  // (major * 100 + minor) * 100 + patch
  const int major = v / 10000, minor = (v / 100) % 100, patch = v % 100;
  std::string s = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
  if (major == NV_TENSORRT_MAJOR && minor == NV_TENSORRT_MINOR && patch == NV_TENSORRT_PATCH)
    s += "." + std::to_string(NV_TENSORRT_BUILD);
  return s;
}

DType from_trt(nvinfer1::DataType t, const std::string& name) {
  using nvinfer1::DataType;
  switch (t) {
    case DataType::kFLOAT: return DType::float32;
    case DataType::kHALF: return DType::float16;
    case DataType::kBF16: return DType::bfloat16;
    case DataType::kINT32: return DType::int32;
    case DataType::kINT64: return DType::int64;
    case DataType::kINT8: return DType::int8;
    case DataType::kUINT8: return DType::uint8;
    case DataType::kBOOL: return DType::boolean;
    default: throw Error("engine tensor " + name + " has a type the runtime does not feed (" + std::to_string(int(t)) + ")");
  }
}

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { cuda_check(cudaMalloc(&ptr, bytes ? bytes : 1), "allocate GPU memory"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct IOTensor {
  std::string name;
  bool input;
  DType dtype;
  std::vector<int64_t> shape;
  size_t bytes;
  std::unique_ptr<DeviceBuffer> device;
};

class TrtSession : public Session {
 public:
  TrtSession(nvinfer1::IRuntime& runtime, const std::string& plan_path, const std::string& network, cudaStream_t stream)
      : network_(network), stream_(stream) {
    std::vector<uint8_t> plan = read_file(plan_path);
    engine_.reset(runtime.deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_)
      throw Error("TensorRT cannot load " + plan_path + " (its message is above); rebuild it with `turbotrt build`");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error("TensorRT cannot create an execution context for " + plan_path + " (out of GPU memory?)");
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      IOTensor io;
      io.name = engine_->getIOTensorName(i);
      io.input = engine_->getTensorIOMode(io.name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
      io.dtype = from_trt(engine_->getTensorDataType(io.name.c_str()), io.name);
      nvinfer1::Dims dims = engine_->getTensorShape(io.name.c_str());
      for (int32_t d = 0; d < dims.nbDims; ++d) {
        if (dims.d[d] < 0) throw Error(plan_path + ": " + io.name + " has a dynamic shape; rebuild the engine with `turbotrt build`");
        io.shape.push_back(int64_t(dims.d[d]));
      }
      io.bytes = numel(io.shape) * dtype_size(io.dtype);
      io.device = std::make_unique<DeviceBuffer>(io.bytes);
      if (!context_->setTensorAddress(io.name.c_str(), io.device->ptr))
        throw Error("TensorRT refused the buffer of " + io.name + " in " + plan_path);
      tensors_.push_back(std::move(io));
    }
  }

  Outputs run(const Feeds& feeds) override {
    for (const auto& io : tensors_) {
      if (!io.input) continue;
      auto it = feeds.find(io.name);
      if (it == feeds.end()) throw Error("missing input " + io.name + " of the " + network_ + " engine");
      const Tensor& t = *it->second;
      if (t.dtype != io.dtype || t.shape != io.shape)
        throw Error("the " + network_ + " engine takes " + io.name + " as " + dtype_name(io.dtype) + " " + shape_str(io.shape) +
                    ", not " + t.describe() + "; rebuild the engine from this bundle's graphs");
      cuda_check(cudaMemcpyAsync(io.device->ptr, t.bytes.data(), io.bytes, cudaMemcpyHostToDevice, stream_), "copy an input");
    }
    if (!context_->enqueueV3(stream_)) throw Error("TensorRT failed to run the " + network_ + " engine (its message is above)");
    Outputs out;
    for (const auto& io : tensors_) {
      if (io.input) continue;
      Tensor t(io.dtype, io.shape);
      cuda_check(cudaMemcpyAsync(t.bytes.data(), io.device->ptr, io.bytes, cudaMemcpyDeviceToHost, stream_), "copy an output");
      out.emplace(io.name, std::move(t));
    }
    cuda_check(cudaStreamSynchronize(stream_), "run the " + network_ + " engine");
    return out;
  }

 private:
  std::string network_;
  cudaStream_t stream_;
  // Destroyed in reverse order: buffers and the context before the engine.
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::vector<IOTensor> tensors_;
};

class TrtBackend : public Backend {
 public:
  explicit TrtBackend(const Bundle& bundle) : bundle_(bundle), target_(compute_capability()), version_(library_version()) {
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) throw Error("TensorRT " + version_ + " failed to start (its message is above)");
    cuda_check(cudaStreamCreate(&stream_), "create a stream");
  }

  ~TrtBackend() override {
    sessions_.clear();  // every engine goes before the runtime and the stream
    cudaStreamDestroy(stream_);
  }

  Session& session(const std::string& network) override {
    auto it = sessions_.find(network);
    if (it == sessions_.end()) {
      const EngineEntry& entry = bundle_.engine_entry(network, "tensorrt", target_, version_);
      // A version-compatible plan embeds TensorRT's lean runtime, which is host code the runtime
      // must be allowed to load (TensorRT's "Version Compatibility" documentation).
      runtime_->setEngineHostCodeAllowed(entry.version_compatible);
      const std::string plan = bundle_.path(entry.file, "engines." + network);
      it = sessions_.emplace(network, std::make_unique<TrtSession>(*runtime_, plan, network, stream_)).first;
    }
    return *it->second;
  }

  std::string describe() const override { return "TensorRT " + version_ + " on " + target_; }

  void check_engines() const {
    for (const auto& network : bundle_.networks()) bundle_.engine_entry(network, "tensorrt", target_, version_);
  }

 private:
  const Bundle& bundle_;
  std::string target_, version_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::map<std::string, std::unique_ptr<TrtSession>> sessions_;
};

}  // namespace

std::unique_ptr<Backend> make_trt_backend(const Bundle& bundle, bool require_all_engines) {
  auto backend = std::make_unique<TrtBackend>(bundle);
  if (require_all_engines) backend->check_engines();
  return backend;
}

}  // namespace turbotrt

#endif  // TURBOTRT_WITH_TENSORRT
