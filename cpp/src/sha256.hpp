// SHA-256 (FIPS 180-4), for the bundle's file digests and the manifest's own digest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace turbotrt {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hexdigest();  // finishes the hash; call once

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(const void* data, size_t size);

}  // namespace turbotrt
