#include "tensor.hpp"

#include "turbotrt/turbotrt.hpp"

namespace turbotrt {

namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
const DTypeInfo DTYPES[] = {{DType::float32, "float32", 4}, {DType::float16, "float16", 2},
                            {DType::bfloat16, "bfloat16", 2}, {DType::int32, "int32", 4},
                            {DType::int64, "int64", 8},       {DType::int8, "int8", 1},
                            {DType::uint8, "uint8", 1},       {DType::boolean, "bool", 1}};
}  // namespace

DType dtype_from_name(const std::string& name) {
  for (const auto& d : DTYPES)
    if (name == d.name) return d.dtype;
  throw Error("unknown dtype " + name);
}

const char* dtype_name(DType d) {
  for (const auto& x : DTYPES)
    if (x.dtype == d) return x.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& x : DTYPES)
    if (x.dtype == d) return x.size;
  return 0;
}

size_t numel(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t s : shape) n *= size_t(s);
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

Tensor::Tensor(DType d, std::vector<int64_t> s) : dtype(d), shape(std::move(s)), bytes(turbotrt::numel(shape) * dtype_size(d)) {}

size_t Tensor::numel() const { return turbotrt::numel(shape); }

std::string Tensor::describe() const { return std::string(dtype_name(dtype)) + " " + shape_str(shape); }

Tensor Tensor::f32(std::vector<int64_t> shape, const float* values) {
  Tensor t(DType::float32, std::move(shape));
  std::memcpy(t.bytes.data(), values, t.bytes.size());
  return t;
}

Tensor concatenate(const std::vector<const Tensor*>& parts, size_t axis) {
  const Tensor& first = *parts.at(0);
  std::vector<int64_t> shape = first.shape;
  shape.at(axis) = 0;
  for (const Tensor* p : parts) {
    bool same = p->dtype == first.dtype && p->shape.size() == first.shape.size();
    for (size_t d = 0; same && d < shape.size(); ++d) same = d == axis || p->shape[d] == first.shape[d];
    if (!same) throw Error("cannot concatenate " + p->describe() + " with " + first.describe());
    shape[axis] += p->shape[axis];
  }
  Tensor out(first.dtype, shape);
  size_t outer = 1, inner = dtype_size(first.dtype);
  for (size_t d = 0; d < axis; ++d) outer *= size_t(shape[d]);
  for (size_t d = axis + 1; d < shape.size(); ++d) inner *= size_t(shape[d]);
  uint8_t* dst = out.bytes.data();
  for (size_t o = 0; o < outer; ++o)
    for (const Tensor* p : parts) {
      size_t n = size_t(p->shape[axis]) * inner;
      std::memcpy(dst, p->bytes.data() + o * n, n);
      dst += n;
    }
  return out;
}

Tensor slice_axis2(const Tensor& t, int64_t i) {
  if (t.shape.size() != 5 || i < 0 || i >= t.shape[2]) throw Error("bad latent frame slice of " + t.describe());
  std::vector<int64_t> shape = t.shape;
  shape[2] = 1;
  Tensor out(t.dtype, shape);
  size_t outer = size_t(t.shape[0] * t.shape[1]), inner = size_t(t.shape[3] * t.shape[4]) * dtype_size(t.dtype);
  for (size_t o = 0; o < outer; ++o)
    std::memcpy(out.bytes.data() + o * inner, t.bytes.data() + (o * size_t(t.shape[2]) + size_t(i)) * inner, inner);
  return out;
}

}  // namespace turbotrt
