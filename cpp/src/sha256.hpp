// SHA-256 (FIPS 180-4), for the bundle's file digests and the manifest's own digest: OpenSSL's
// libcrypto when the build found it (several times faster on CPUs with SHA extensions, which
// matters for bundles of tens of GB), else the portable implementation below.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace turbotrt {

// The portable implementation, always compiled (and tested against Python's hashlib).
class PortableSha256 {
 public:
  PortableSha256();
  void update(const void* data, size_t size);
  std::string hexdigest();  // finishes the hash; call once

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t size);
  std::string hexdigest();  // finishes the hash; call once
  static const char* implementation();  // "OpenSSL" or "portable"

 private:
  void* evp_ = nullptr;  // OpenSSL's EVP_MD_CTX, when built with it
  PortableSha256 portable_;
};

std::string sha256_hex(const void* data, size_t size);

}  // namespace turbotrt
