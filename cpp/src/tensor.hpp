// A host tensor: dtype, shape and raw bytes, passed between graphs without conversion (VAE caches
// keep the bundle's float type, fp16 or bf16, exactly as the Python runtime passes numpy arrays).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace turbotrt {

enum class DType { float32, float16, bfloat16, int32, int64, int8, uint8, boolean };

// From and to numpy's names, as the manifest spells them (IO_DTYPES); Error for others.
DType dtype_from_name(const std::string& name);
const char* dtype_name(DType d);
size_t dtype_size(DType d);

struct Tensor {
  DType dtype = DType::float32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  Tensor() = default;
  Tensor(DType d, std::vector<int64_t> s);  // zero-filled
  size_t numel() const;
  template <class T> T* data() { return reinterpret_cast<T*>(bytes.data()); }
  template <class T> const T* data() const { return reinterpret_cast<const T*>(bytes.data()); }
  std::string describe() const;  // "float32 [1, 16, 5, 8, 16]"

  static Tensor f32(std::vector<int64_t> shape, const float* values);
};

size_t numel(const std::vector<int64_t>& shape);
std::string shape_str(const std::vector<int64_t>& shape);  // "[1, 16, 5, 8, 16]"

// Tensors joined along axis `axis` (same dtype, same other dims), as np.concatenate.
Tensor concatenate(const std::vector<const Tensor*>& parts, size_t axis);
// t[:, :, i:i+1] of a 5-d tensor (latent frame i), as numpy slicing does.
Tensor slice_axis2(const Tensor& t, int64_t i);

}  // namespace turbotrt
