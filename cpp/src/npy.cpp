#include "npy.hpp"

#include <cstring>

namespace turbotrt {

std::vector<uint8_t> npy_bytes(const std::string& descr, const std::vector<int64_t>& shape, const void* data, size_t bytes) {
  std::string dims;
  for (int64_t s : shape) dims += std::to_string(s) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Pad with spaces and a newline so the data starts at a multiple of 64 bytes.
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  const uint8_t magic[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, uint8_t(header.size() & 0xFF), uint8_t(header.size() >> 8)};
  std::vector<uint8_t> out(10 + header.size() + bytes);
  std::memcpy(out.data(), magic, 10);
  std::memcpy(out.data() + 10, header.data(), header.size());
  if (bytes) std::memcpy(out.data() + 10 + header.size(), data, bytes);
  return out;
}

}  // namespace turbotrt
