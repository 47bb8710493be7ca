// ONNX Runtime through its C++ API (onnxruntime_cxx_api.h): the CUDA execution provider when this
// ONNX Runtime has it, else the CPU provider, with the Python runtime's session options, so both
// compute the same numbers.
#include <onnxruntime_cxx_api.h>

#include <algorithm>

#include "backend.hpp"

namespace turbotrt {

namespace {

ONNXTensorElementDataType ort_type(DType d) {
  switch (d) {
    case DType::float32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::float16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::bfloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    case DType::int32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case DType::int64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case DType::int8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case DType::uint8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case DType::boolean: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

DType from_ort(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::float32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::float16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return DType::bfloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return DType::int32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return DType::int64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return DType::int8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return DType::uint8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return DType::boolean;
    default: throw Error("a graph output has an element type turbotrt does not use (" + std::to_string(int(t)) + ")");
  }
}

class OrtSession : public Session {
 public:
  OrtSession(Ort::Env& env, const std::string& path, bool cuda) {
    Ort::SessionOptions opts;
    opts.SetLogSeverityLevel(3);
    if (cuda) {
      OrtCUDAProviderOptionsV2* cuda_opts = nullptr;
      Ort::ThrowOnError(Ort::GetApi().CreateCUDAProviderOptions(&cuda_opts));
      std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> owned(
          cuda_opts, [](OrtCUDAProviderOptionsV2* p) { Ort::GetApi().ReleaseCUDAProviderOptions(p); });
      opts.AppendExecutionProvider_CUDA_V2(*cuda_opts);
    }
    session_ = std::make_unique<Ort::Session>(env, path.c_str(), opts);
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < session_->GetInputCount(); ++i) inputs_.push_back(session_->GetInputNameAllocated(i, alloc).get());
    for (size_t i = 0; i < session_->GetOutputCount(); ++i) outputs_.push_back(session_->GetOutputNameAllocated(i, alloc).get());
  }

  Outputs run(const Feeds& feeds) override {
    std::vector<std::string> missing;
    for (const auto& n : inputs_)
      if (!feeds.count(n)) missing.push_back(n);
    if (!missing.empty()) {
      std::string names;
      for (const auto& n : missing) names += (names.empty() ? "'" : ", '") + n + "'";
      throw Error("missing inputs [" + names + "]");
    }
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> values;
    std::vector<const char*> in_names, out_names;
    for (const auto& n : inputs_) {
      const Tensor* t = feeds.at(n);
      // ONNX Runtime reads the buffer and does not write it: the const_cast is for the C API's signature.
      values.push_back(Ort::Value::CreateTensor(mem, const_cast<uint8_t*>(t->bytes.data()), t->bytes.size(), t->shape.data(),
                                                t->shape.size(), ort_type(t->dtype)));
      in_names.push_back(n.c_str());
    }
    for (const auto& n : outputs_) out_names.push_back(n.c_str());
    auto results = session_->Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(), values.size(), out_names.data(),
                                 out_names.size());
    Outputs out;
    for (size_t i = 0; i < results.size(); ++i) {
      auto info = results[i].GetTensorTypeAndShapeInfo();
      Tensor t(from_ort(info.GetElementType()), info.GetShape());
      std::memcpy(t.bytes.data(), results[i].GetTensorRawData(), t.bytes.size());
      out.emplace(outputs_[i], std::move(t));
    }
    return out;
  }

 private:
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::string> inputs_, outputs_;
};

class OrtBackend : public Backend {
 public:
  // ONNX Runtime counts its environments; each backend holds one, so it outlives the backend's sessions.
  explicit OrtBackend(const Bundle& bundle) : bundle_(bundle), env_(ORT_LOGGING_LEVEL_ERROR, "turbotrt") {
    auto available = Ort::GetAvailableProviders();
    cuda_ = std::find(available.begin(), available.end(), "CUDAExecutionProvider") != available.end();
    if (bundle.manifest.float_precision == "bf16" && !cuda_)
      throw Error(bundle.root + " is a bf16 bundle and ONNX Runtime's CPU provider has no bf16 kernels: run it on an "
                  "NVIDIA GPU (onnxruntime-gpu, or TensorRT engines from `turbotrt build`), or export with --precision "
                  "fp32 or fp16 to run on a CPU");
  }

  Session& session(const std::string& network) override {
    auto it = sessions_.find(network);
    if (it == sessions_.end()) {
      std::string path = bundle_.graph(network);
      try {
        it = sessions_.emplace(network, std::make_unique<OrtSession>(env_, path, cuda_)).first;
      } catch (const Ort::Exception& e) {
        throw Error("ONNX Runtime cannot load " + path + ": " + e.what());
      }
    }
    return *it->second;
  }

  std::string describe() const override {
    return cuda_ ? "ONNX Runtime (CUDAExecutionProvider, CPUExecutionProvider)" : "ONNX Runtime (CPUExecutionProvider)";
  }

 private:
  const Bundle& bundle_;
  Ort::Env env_;  // errors only, as the Python runtime's log_severity_level = 3
  bool cuda_ = false;
  std::map<std::string, std::unique_ptr<OrtSession>> sessions_;
};

}  // namespace

std::unique_ptr<Backend> make_ort_backend(const Bundle& bundle) {
  try {
    return std::make_unique<OrtBackend>(bundle);
  } catch (const Ort::Exception& e) {
    throw Error(std::string("ONNX Runtime failed to start: ") + e.what());
  }
}

}  // namespace turbotrt
