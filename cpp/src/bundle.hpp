// A bundle, read and checked as turbotrt/core/bundle.py's Bundle.load and
// turbotrt/core/manifest.py's Manifest.from_json do: the same refusals, in the same order, with
// the same messages. The manifest is untrusted input: every path is confined to the bundle folder
// (no absolute paths, no `..`, no symlinks) and every shape is bounded by the profile.
//
// One deliberate difference: Python also requires the model section to equal one of its presets
// (turbotrt/core/configs.py); C++ checks the fields it uses instead of carrying that table, and
// bounds every tensor by the profile the same way.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "turbotrt/turbotrt.hpp"

namespace turbotrt {

constexpr int SCHEMA_VERSION = 2;
constexpr const char* MANIFEST = "manifest.json";

struct IOSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // numpy's name: float32, float16, bfloat16, int32, int64, int8, uint8, bool
};

struct GraphSpec {
  std::string network;
  std::vector<IOSpec> inputs, outputs;
  std::string precision;
  const IOSpec* input(const std::string& name) const;
  const IOSpec* output(const std::string& name) const;
};

struct GraphEntry {
  std::string file;                 // the .onnx, relative to the bundle
  std::optional<std::string> data;  // its external-data file
  GraphSpec spec;
};

struct EngineEntry {
  std::string file, flavour, target, library_version, sha256, attention;
  std::string hardware_compatibility = "none";
  bool version_compatible = false;
};

struct ModelInfo {
  std::string name;
  int64_t in_dim = 16, out_dim = 16, freq_dim = 256, text_dim = 4096, text_len = 512;
  double sigma_max = 80.0;
  std::vector<std::string> experts;  // I2V A14B: {"high", "low"}
  std::optional<double> boundary;
  bool is_i2v() const { return in_dim != out_dim; }
};

struct Manifest {
  ModelInfo model;
  Profile profile;
  std::string precision;
  std::string float_precision;  // of what is not quantized: the precision, or quantization.float_precision
  std::vector<std::pair<std::string, GraphEntry>> graphs;  // in the file's order
  std::optional<std::string> tokenizer;
  std::vector<std::string> quantization_files;  // calibration cache and report, when quantized
  std::vector<std::pair<std::string, std::vector<EngineEntry>>> engines;
  std::vector<std::pair<std::string, std::string>> files;  // relative path -> sha256

  std::vector<std::string> referenced_files() const;
};

// Parse and check manifest bytes (`where`: the file's name in messages). verify_digest: also check
// manifest_sha256 (sha256 of the bytes with those 64 hex digits replaced by '0').
Manifest parse_manifest(const std::vector<uint8_t>& raw, bool verify_digest, const std::string& where);
void check_digest(const std::vector<uint8_t>& raw, const std::string& where);

class Bundle {
 public:
  // Read and check a bundle. verify: also hash every file (and the manifest's own digest).
  static Bundle load(const std::string& path, bool verify = true);

  // root/rel, confined to the bundle (no absolute paths, `..` or symlinks).
  std::string path(const std::string& rel, const std::string& what = "file") const;
  void check_files(bool hashes) const;

  const GraphEntry& entry(const std::string& network) const;
  bool has_graph(const std::string& network) const;
  std::vector<std::string> networks() const;
  std::string graph(const std::string& network) const;  // path of its .onnx
  const GraphSpec& spec(const std::string& network) const;
  std::string tokenizer() const;
  // The plan of `flavour` for this GPU (`target`, "sm_89") and library version, or an Error that
  // names the `turbotrt build` command that makes one.
  std::string engine(const std::string& network, const std::string& flavour, const std::string& target,
                     const std::string& library_version) const;
  // The manifest entry of that plan (same matching and refusals).
  const EngineEntry& engine_entry(const std::string& network, const std::string& flavour, const std::string& target,
                                  const std::string& library_version) const;

  std::string root;  // as Python prints Path(path)
  Manifest manifest;
};

}  // namespace turbotrt
