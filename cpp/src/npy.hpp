// .npy files (NumPy's format 1.0: magic, little-endian header dict, raw C-order data), so results can
// be compared with numpy.load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace turbotrt {

// descr: "<f4", "|u1", "<f8", ...
std::vector<uint8_t> npy_bytes(const std::string& descr, const std::vector<int64_t>& shape, const void* data, size_t bytes);

}  // namespace turbotrt
