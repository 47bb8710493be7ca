// Mirrors turbotrt/core/manifest.py (Manifest.from_json and its checks) and turbotrt/core/bundle.py
// (Bundle.load, check_files, engine): keep the order of the checks and the messages in step with them.
#include "bundle.hpp"

#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "files.hpp"
#include "json_util.hpp"
#include "noise.hpp"
#include "sha256.hpp"
#include "tensor.hpp"

namespace turbotrt {

namespace {

const char* const PRECISIONS[] = {"fp32", "fp16", "bf16", "int8", "fp8"};
const char* const FLOAT_PRECISIONS[] = {"fp32", "fp16", "bf16"};
const char* const QUANT_MODES[] = {"int8", "fp8"};
const char* const IO_DTYPES[] = {"float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool"};
const char* const ENGINE_FLAVOURS[] = {"tensorrt", "tensorrt-rtx"};
const char* const ATTENTION_IMPLEMENTATIONS[] = {"sagesla-plugin", "function-body", "none"};
const int64_t MAX_TENSOR_PER_PIXEL = 256;
const int64_t MAX_GRAPH_PER_PIXEL = 4096;
const int64_t MAX_FRAMES = 125;
const int64_t VAE_STRIDE_T = 4, VAE_STRIDE_HW = 8;
// Profiles are at most 720p's pixel count (the largest turbotrt exports); Python bounds them by its
// table of resolutions.
const int64_t MAX_PIXELS = 1280 * 720;
const std::string DIGEST_KEY = "manifest_sha256";

template <size_t N>
bool one_of(const std::string& s, const char* const (&set)[N]) {
  for (const char* x : set)
    if (s == x) return true;
  return false;
}

template <size_t N>
std::string joined(const char* const (&set)[N]) {
  std::string out;
  for (size_t i = 0; i < N; ++i) out += (i ? ", " : "") + std::string(set[i]);
  return out;
}

std::string join(const std::vector<std::string>& v, const std::string& sep = ", ") {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

Error fail(const std::string& msg) { return Error("invalid manifest: " + msg + "; export the bundle again"); }

enum class Kind { dict, list, str, integer, number, any };

bool is_kind(const Json& v, Kind k) {
  switch (k) {
    case Kind::dict: return v.is_object();
    case Kind::list: return v.is_array();
    case Kind::str: return v.is_string();
    case Kind::integer: return v.is_number_integer();  // never a bool in nlohmann
    case Kind::number: return v.is_number();
    default: return true;
  }
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::dict: return "dict";
    case Kind::list: return "list";
    case Kind::str: return "str";
    case Kind::integer: return "int";
    case Kind::number: return "(<class 'int'>, <class 'float'>)";
    default: return "object";
  }
}

// manifest.py's _get: d[key] of the right kind (a bool is never an int or a float).
const Json& get(const Json& d, const std::string& key, Kind kind, const std::string& what) {
  if (!d.is_object() || !d.contains(key)) throw fail(what + " lacks " + py_repr(key));
  const Json& v = d[key];
  if (!is_kind(v, kind)) throw fail(what + "." + key + " is " + py_type(v) + ", not " + kind_name(kind));
  return v;
}

// Python's truth value of a JSON value.
bool truthy(const Json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0;
  if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
  return true;
}

std::string relpath(const Json& v, const std::string& what) {
  if (!v.is_string()) throw UnsafePathError(what + ": " + py_repr(v) + " is not a relative path");
  return check_relpath(v.get<std::string>(), what);
}

IOSpec parse_io(const Json& d, const std::string& what) {
  static const std::regex io_name("[A-Za-z_][A-Za-z0-9_.]{0,63}");
  IOSpec io;
  io.name = get(d, "name", Kind::str, what).get<std::string>();
  if (!std::regex_match(io.name, io_name)) throw fail(what + ": tensor name " + py_repr(io.name) + " is not a plain identifier");
  const Json& shape = get(d, "shape", Kind::list, what);
  bool ok = shape.size() >= 1 && shape.size() <= 8;
  for (const auto& s : shape) ok = ok && s.is_number_integer() && s.get<int64_t>() >= 1 && s.get<int64_t>() <= 2147483647;
  if (!ok) throw fail(what + "." + io.name + ": shape " + py_repr(shape) + " is not a static shape of positive ints");
  for (const auto& s : shape) io.shape.push_back(s.get<int64_t>());
  io.dtype = get(d, "dtype", Kind::str, what).get<std::string>();
  if (!one_of(io.dtype, IO_DTYPES))
    throw fail(what + "." + io.name + ": dtype " + py_repr(io.dtype) + " is not one of " + joined(IO_DTYPES));
  return io;
}

GraphSpec parse_spec(const Json& d, const std::string& what) {
  GraphSpec spec;
  spec.network = check_identifier(get(d, "network", Kind::str, what).get<std::string>(), what + ".network");
  for (const auto& i : get(d, "inputs", Kind::list, what)) spec.inputs.push_back(parse_io(i, what + ".inputs"));
  for (const auto& o : get(d, "outputs", Kind::list, what)) spec.outputs.push_back(parse_io(o, what + ".outputs"));
  std::set<std::string> names;
  for (const auto* group : {&spec.inputs, &spec.outputs})
    for (const auto& io : *group) names.insert(io.name);
  if (spec.inputs.empty() || spec.outputs.empty() || names.size() != spec.inputs.size() + spec.outputs.size())
    throw fail(what + ": inputs/outputs missing or named twice");
  spec.precision = get(d, "precision", Kind::str, what).get<std::string>();
  if (!one_of(spec.precision, FLOAT_PRECISIONS))
    throw fail(what + ": precision " + py_repr(spec.precision) + " is not one of " + joined(FLOAT_PRECISIONS));
  if (d.contains("extra") && !d["extra"].is_object()) throw fail(what + ".extra is not an object");
  const Json& tol = get(d, "tolerance", Kind::dict, what);
  std::vector<double> vals;
  Json shown = Json::array();
  for (const char* k : {"atol", "rtol", "min_cosine"}) {
    shown.push_back(get(tol, k, Kind::number, what));
    vals.push_back(shown.back().get<double>());
  }
  bool ok = vals[2] <= 1;
  for (double v : vals) ok = ok && std::isfinite(v) && v >= 0;
  if (!ok) throw fail(what + ": tolerance " + py_repr(shown) + " out of range");
  return spec;
}

EngineEntry parse_engine(const Json& d, const std::string& what) {
  static const std::regex target("sm_\\d{2,3}a?"), sha("[0-9a-f]{64}");
  EngineEntry e;
  e.file = check_relpath(get(d, "file", Kind::str, what).get<std::string>(), what + ".file");
  e.flavour = get(d, "flavour", Kind::str, what).get<std::string>();
  e.target = get(d, "target", Kind::str, what).get<std::string>();
  e.library_version = get(d, "library_version", Kind::str, what).get<std::string>();
  e.sha256 = get(d, "sha256", Kind::str, what).get<std::string>();
  get(d, "bytes", Kind::integer, what);
  e.attention = get(d, "attention", Kind::str, what).get<std::string>();
  if (d.contains("hardware_compatibility")) {
    const Json& h = d["hardware_compatibility"];
    e.hardware_compatibility = h.is_string() ? h.get<std::string>() : py_repr(h);
  }
  e.version_compatible = d.contains("version_compatible") && truthy(d["version_compatible"]);
  if (!one_of(e.flavour, ENGINE_FLAVOURS) || !one_of(e.attention, ATTENTION_IMPLEMENTATIONS))
    throw fail(what + ": unknown flavour " + py_repr(e.flavour) + " or attention " + py_repr(e.attention));
  if (!std::regex_match(e.target, target) || !std::regex_match(e.sha256, sha))
    throw fail(what + ": bad target " + py_repr(e.target) + " or sha256");
  if (e.file.rfind("engines/", 0) != 0) throw fail(what + ": engine file " + py_repr(e.file) + " is not under engines/");
  return e;
}

ModelInfo parse_model(const Json& d) {
  ModelInfo m;
  m.name = get(d, "name", Kind::str, "model").get<std::string>();
  for (auto [key, field] : {std::pair<const char*, int64_t*>{"in_dim", &m.in_dim}, {"out_dim", &m.out_dim},
                            {"freq_dim", &m.freq_dim}, {"text_dim", &m.text_dim}, {"text_len", &m.text_len}}) {
    *field = get(d, key, Kind::integer, "model").get<int64_t>();
    if (*field < 1 || *field > 65536) throw fail(std::string("model.") + key + " " + std::to_string(*field) + " is out of range");
  }
  if (m.freq_dim % 2) throw fail("model.freq_dim " + std::to_string(m.freq_dim) + " is odd");
  if (m.in_dim < m.out_dim) throw fail("model.in_dim is smaller than model.out_dim");
  m.sigma_max = get(d, "sigma_max", Kind::number, "model").get<double>();
  if (!(std::isfinite(m.sigma_max) && m.sigma_max > 0)) throw fail("model.sigma_max must be positive");
  for (const auto& e : get(d, "experts", Kind::list, "model")) {
    if (!e.is_string()) throw fail("model.experts holds " + py_repr(e));
    m.experts.push_back(check_identifier(e.get<std::string>(), "model.experts"));
  }
  if (!d.contains("boundary") || !(d["boundary"].is_null() || d["boundary"].is_number()))
    throw fail("model.boundary must be a number or null");
  if (d["boundary"].is_number()) m.boundary = d["boundary"].get<double>();
  if (!(m.experts.empty() || m.experts.size() == 2) || m.experts.empty() == m.boundary.has_value())
    throw fail("model " + py_repr(m.name) + ": experts (none or two) and boundary go together");
  return m;
}

Profile parse_profile(const Json& d, const ModelInfo& model) {
  Profile p;
  p.resolution = get(d, "resolution", Kind::str, "profile").get<std::string>();
  int64_t frames = get(d, "frames", Kind::integer, "profile").get<int64_t>();
  p.aspect = get(d, "aspect", Kind::str, "profile").get<std::string>();
  if (frames < 1 || (frames - 1) % VAE_STRIDE_T || frames > MAX_FRAMES)
    throw fail("profile: frames must be of the form 4k+1 between 1 and 125 (e.g. 17, 49, 81); got " + std::to_string(frames));
  int64_t w = get(d, "width", Kind::integer, "profile").get<int64_t>();
  int64_t h = get(d, "height", Kind::integer, "profile").get<int64_t>();
  int64_t batch = d.contains("batch") ? get(d, "batch", Kind::integer, "profile").get<int64_t>() : 1;
  if (batch != 1) throw fail("profile " + py_repr(d) + ": batch " + std::to_string(batch) + ", turbotrt runs batch 1");
  if (w < 16 || h < 16 || w % 16 || h % 16 || w * h > MAX_PIXELS)
    throw fail("profile: " + std::to_string(w) + "x" + std::to_string(h) +
               " is not a size turbotrt exports (multiples of 16, at most 1280x720 pixels)");
  p.width = int(w);
  p.height = int(h);
  p.frames = int(frames);
  p.batch = 1;
  std::string aspect = p.aspect;
  for (auto& c : aspect)
    if (c == ':') c = 'x';
  p.name = p.resolution + "-" + aspect + "-" + std::to_string(frames) + "f";
  p.latent_shape = {1, model.out_dim, 1 + (frames - 1) / VAE_STRIDE_T, h / VAE_STRIDE_HW, w / VAE_STRIDE_HW};
  return p;
}

// manifest.py's _check_bounds: shapes follow from the model and the profile; nothing exceeds what
// the profile implies.
void check_bounds(const GraphSpec& spec, const ModelInfo& model, const Profile& profile) {
  const int64_t b = 1, H = profile.height, W = profile.width, pixels = b * H * W;
  const auto& latent = profile.latent_shape;
  const int64_t lt = latent[2], h = latent[3], w = latent[4];
  std::vector<std::pair<std::string, std::vector<int64_t>>> exact;
  const std::string& name = spec.network;
  if (name.rfind("dit", 0) == 0) {
    exact = {{"x", latent}, {"t_freq", {b, model.freq_dim}}, {"context", {b, model.text_len, model.text_dim}}, {"velocity", latent}};
    if (model.is_i2v()) exact.push_back({"y", {b, model.in_dim - model.out_dim, lt, h, w}});
  } else if (name == "text_encoder") {
    exact = {{"ids", {b, model.text_len}}, {"mask", {b, model.text_len}}, {"context", {b, model.text_len, model.text_dim}}};
  } else if (name.rfind("vae_", 0) == 0) {
    bool first = name.size() >= 6 && name.compare(name.size() - 6, 6, "_first") == 0;
    exact = {{"z", {b, model.out_dim, 1, h, w}}, {"video", {b, 3, first ? 1 : VAE_STRIDE_T, H, W}}};
  }
  int64_t total = 0;
  std::set<std::string> names;
  for (const auto* group : {&spec.inputs, &spec.outputs})
    for (const auto& io : *group) {
      names.insert(io.name);
      for (const auto& [n, want] : exact)
        if (n == io.name && io.shape != want)
          throw fail("graphs." + name + ": " + io.name + " has shape " + shape_str(io.shape) + ", but model " + model.name +
                     " at " + profile.name + " implies " + shape_str(want));
      // Each dim is < 2^31 and at most 8 of them: check the product step by step so it cannot overflow.
      int64_t n = 1;
      for (int64_t s : io.shape) {
        n = n > MAX_TENSOR_PER_PIXEL * pixels / s ? MAX_TENSOR_PER_PIXEL * pixels + 1 : n * s;
      }
      if (n > MAX_TENSOR_PER_PIXEL * pixels)
        throw fail("graphs." + name + ": " + io.name + " " + shape_str(io.shape) + " is larger than profile " + profile.name + " allows");
      total += n;
    }
  std::vector<std::string> missing;
  for (const auto& [n, want] : exact)
    if (!names.count(n) && n != "y") missing.push_back(n);
  if ((name.rfind("dit", 0) == 0 || name.rfind("text_encoder", 0) == 0) && !missing.empty())
    throw fail("graphs." + name + " lacks " + join(missing));
  if (total > MAX_GRAPH_PER_PIXEL * pixels)
    throw fail("graphs." + name + ": its inputs and outputs are larger than profile " + profile.name + " allows");
}

Manifest manifest_from_json(const Json& d) {
  Manifest m;
  m.model = parse_model(get(d, "model", Kind::dict, "manifest"));
  m.profile = parse_profile(get(d, "profile", Kind::dict, "manifest"), m.model);
  get(d, "attention", Kind::dict, "manifest");
  m.precision = get(d, "precision", Kind::str, "manifest").get<std::string>();
  if (!one_of(m.precision, PRECISIONS)) throw fail("precision " + py_repr(m.precision) + " is not one of " + joined(PRECISIONS));
  m.float_precision = m.precision;
  const Json q = d.contains("quantization") ? d["quantization"] : Json();
  if (!q.is_null()) {
    const std::string what = "quantization";
    std::string mode = get(q, "mode", Kind::str, what).get<std::string>();
    std::string fp = get(q, "float_precision", Kind::str, what).get<std::string>();
    get(q, "observer", Kind::str, what);
    get(q, "config_hash", Kind::str, what);
    for (const auto& n : get(q, "networks", Kind::list, what)) {
      if (!n.is_string()) throw UnsafePathError(what + ".networks: " + py_repr(n) + " is not a plain name (lowercase letters, digits, '_')");
      check_identifier(n.get<std::string>(), what + ".networks");
    }
    get(q, "quantized_linears", Kind::list, what);
    m.quantization_files.push_back(check_relpath(get(q, "cache", Kind::str, what).get<std::string>(), what + ".cache"));
    m.quantization_files.push_back(check_relpath(get(q, "report", Kind::str, what).get<std::string>(), what + ".report"));
    if (!one_of(mode, QUANT_MODES) || !one_of(fp, FLOAT_PRECISIONS))
      throw fail(what + ": mode " + py_repr(mode) + " / float precision " + py_repr(fp) + " unknown");
    if (mode != m.precision)
      throw fail("precision " + py_repr(m.precision) + " and quantization " + py_repr(mode) + " disagree");
    m.float_precision = fp;
  } else if (one_of(m.precision, QUANT_MODES)) {
    throw fail("precision " + py_repr(m.precision) + " and quantization None disagree");
  }
  const Json& s = get(d, "sampler", Kind::dict, "manifest");
  double sigma_max = get(s, "sigma_max", Kind::number, "sampler").get<double>();
  const Json boundary = s.contains("boundary") ? s["boundary"] : Json();
  std::vector<std::string> experts;
  for (const auto& e : get(s, "experts", Kind::list, "sampler")) experts.push_back(e.is_string() ? e.get<std::string>() : py_repr(e));
  std::string noise = get(s, "noise", Kind::str, "sampler").get<std::string>();
  int64_t noise_version = get(s, "noise_version", Kind::integer, "sampler").get<int64_t>();
  bool same_boundary = m.model.boundary ? boundary.is_number() && boundary.get<double>() == *m.model.boundary : boundary.is_null();
  if (sigma_max != m.model.sigma_max || !same_boundary || experts != m.model.experts)
    throw fail("the sampler settings differ from preset " + m.model.name + "'s");
  if (noise != NOISE_GENERATOR || noise_version != NOISE_VERSION)
    throw fail("noise generator " + noise + " v" + std::to_string(noise_version) + " is not this turbotrt's (" +
               NOISE_GENERATOR + " v" + std::to_string(NOISE_VERSION) + ")");
  const Json& graphs = get(d, "graphs", Kind::dict, "manifest");
  for (auto it = graphs.begin(); it != graphs.end(); ++it) {
    const std::string& name = it.key();
    const Json& g = it.value();
    check_identifier(name, "graph name");
    const std::string what = "graphs." + name;
    GraphEntry entry;
    entry.spec = parse_spec(get(g, "spec", Kind::dict, what), what + ".spec");
    if (entry.spec.network != name) throw fail(what + ": its spec is for " + py_repr(entry.spec.network));
    entry.file = check_relpath(get(g, "file", Kind::str, what).get<std::string>(), what + ".file");
    if (g.contains("data") && !g["data"].is_null()) entry.data = relpath(g["data"], what + ".data");
    check_bounds(entry.spec, m.model, m.profile);
    m.graphs.emplace_back(name, std::move(entry));
  }
  if (m.graphs.empty()) throw fail("no graphs");
  if (d.contains("tokenizer") && !d["tokenizer"].is_null()) m.tokenizer = relpath(d["tokenizer"], "tokenizer");
  static const std::regex sha("[0-9a-f]{64}");
  const Json& files = get(d, "files", Kind::dict, "manifest");
  for (auto it = files.begin(); it != files.end(); ++it) {
    check_relpath(it.key(), "files");
    if (!it.value().is_string() || !std::regex_match(it.value().get<std::string>(), sha))
      throw fail("files[" + py_repr(it.key()) + "] is not a sha256 hex digest");
    m.files.emplace_back(it.key(), it.value().get<std::string>());
  }
  if (d.contains("engines") && truthy(d["engines"])) {
    const Json& engines = d["engines"];
    if (!engines.is_object()) throw fail("engines is not an object");
    for (auto it = engines.begin(); it != engines.end(); ++it) {
      bool known = false;
      for (const auto& [n, _] : m.graphs) known = known || n == it.key();
      if (!known || !it.value().is_array()) throw fail("engines for unknown graph " + py_repr(it.key()));
      std::vector<EngineEntry> entries;
      for (const auto& e : it.value()) entries.push_back(parse_engine(e, "engines." + it.key()));
      m.engines.emplace_back(it.key(), std::move(entries));
    }
  }
  std::set<std::string> listed;
  for (const auto& [rel, _] : m.files) listed.insert(rel);
  std::vector<std::string> unlisted;
  for (const auto& f : m.referenced_files())
    if (!listed.count(f)) unlisted.push_back(f);
  if (!unlisted.empty()) throw fail(join(unlisted) + " not covered by a sha256 in `files`");
  return m;
}

std::string unsafe_suffix(const std::string& root, const UnsafePathError& e) {
  return root + ": " + e.what() + "; the bundle was edited by hand or is not from turbotrt";
}

int sm(const std::string& cc) {
  std::string s = cc.rfind("sm_", 0) == 0 ? cc.substr(3) : cc;
  while (!s.empty() && s.back() == 'a') s.pop_back();
  try {
    return std::stoi(s);
  } catch (...) {
    return 0;
  }
}

bool version_tuple(const std::string& v, std::vector<long>& out) {
  out.clear();
  size_t start = 0;
  for (int i = 0; i < 3 && start <= v.size(); ++i) {
    size_t dot = v.find('.', start);
    std::string part = v.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (part.empty() || part.find_first_not_of("0123456789") != std::string::npos) return false;
    out.push_back(std::stol(part));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return true;
}

bool gpu_fits(const EngineEntry& e, const std::string& target) {
  if (e.target == target) return true;
  return e.hardware_compatibility == "ampere_plus" && sm(target) >= 80;
}

bool library_fits(const EngineEntry& e, const std::string& version) {
  if (e.library_version == version) return true;
  std::vector<long> built, now;
  if (!version_tuple(e.library_version, built) || !version_tuple(version, now)) return false;
  return e.version_compatible && now[0] == built[0] && now >= built;
}

}  // namespace

const IOSpec* GraphSpec::input(const std::string& name) const {
  for (const auto& io : inputs)
    if (io.name == name) return &io;
  return nullptr;
}

const IOSpec* GraphSpec::output(const std::string& name) const {
  for (const auto& io : outputs)
    if (io.name == name) return &io;
  return nullptr;
}

std::vector<std::string> Manifest::referenced_files() const {
  std::vector<std::string> out;
  for (const auto& [_, g] : graphs) {
    out.push_back(g.file);
    if (g.data) out.push_back(*g.data);
  }
  if (tokenizer) out.push_back(*tokenizer);
  for (const auto& f : quantization_files) out.push_back(f);
  for (const auto& [_, entries] : engines)
    for (const auto& e : entries) out.push_back(e.file);
  return out;
}

void check_digest(const std::vector<uint8_t>& raw, const std::string& where) {
  // The first match of the regex  "manifest_sha256": "([0-9a-f]{64})"  in the raw bytes.
  const std::string text(raw.begin(), raw.end());
  const std::string prefix = "\"" + DIGEST_KEY + "\": \"";
  for (size_t at = text.find(prefix); at != std::string::npos; at = text.find(prefix, at + 1)) {
    size_t start = at + prefix.size();
    if (start + 65 > text.size() || text[start + 64] != '"') continue;
    std::string digest = text.substr(start, 64);
    if (digest.find_first_not_of("0123456789abcdef") != std::string::npos) continue;
    std::string zeroed = text;
    zeroed.replace(start, 64, std::string(64, '0'));
    if (sha256_hex(zeroed.data(), zeroed.size()) != digest)
      throw Error(where + " changed since it was written (its " + DIGEST_KEY +
                  " does not match): it was edited or damaged; export the bundle again (or pass --no-verify to skip the check)");
    return;
  }
  throw Error(where + " has no " + DIGEST_KEY + "; export the bundle again");
}

Manifest parse_manifest(const std::vector<uint8_t>& raw, bool verify_digest, const std::string& where) {
  Json d;
  try {
    d = parse_json(std::string(raw.begin(), raw.end()));
  } catch (const Json::exception& e) {
    throw Error(where + " is not valid JSON (" + e.what() + "); export the bundle again");
  }
  if (!d.is_object()) throw Error(where + " is not a JSON object; export the bundle again");
  const Json version = d.contains("schema_version") ? d["schema_version"] : Json();
  // Python compares with ==, so 2.0 passes and True (== 1) does not.
  if (!(version.is_number() && !version.is_boolean() && version.get<double>() == SCHEMA_VERSION))
    throw Error(where + ": bundle schema version " + py_repr(version) + ", this turbotrt reads version " +
                std::to_string(SCHEMA_VERSION) +
                "; export it again with this version (or install the turbotrt that wrote it)");
  if (verify_digest) check_digest(raw, where);
  try {
    return manifest_from_json(d);
  } catch (const UnsafePathError& e) {
    throw Error(where + ": " + e.what());
  } catch (const Json::exception& e) {
    throw fail(e.what());
  }
}

Bundle Bundle::load(const std::string& path, bool verify) {
  const std::string root = py_path(path);
  if (!is_dir(root)) throw Error(root + " is not a folder (a bundle is the folder `turbotrt export --out` wrote)");
  const std::string mf = py_path(root + "/" + MANIFEST);
  if (is_symlink(mf)) throw Error(mf + " is a symlink; bundles hold no symlinks");
  if (!is_file(mf)) {
    size_t slash = root.rfind('/');
    std::string name = slash == std::string::npos ? root : root.substr(slash + 1);
    std::string hint;
    if (name != "." && name != ".." && !name.empty()) {
      std::string partial = (slash == std::string::npos ? "" : root.substr(0, slash + 1)) + name + ".partial";
      if (exists(partial) || is_symlink(partial)) hint = " (an export into it was interrupted: export again)";
    }
    throw Error(root + " is not a turbotrt bundle: no " + MANIFEST + hint);
  }
  std::vector<uint8_t> raw = read_file(mf);
  Bundle bundle;
  bundle.root = root;
  bundle.manifest = parse_manifest(raw, verify, mf);
  bundle.check_files(verify);
  return bundle;
}

std::string Bundle::path(const std::string& rel, const std::string& what) const {
  try {
    return inside(root, rel, what);
  } catch (const UnsafePathError& e) {
    throw Error(unsafe_suffix(root, e));
  }
}

void Bundle::check_files(bool hashes) const {
  const auto& files = manifest.files;
  if (files.empty()) throw Error(root + ": the manifest lists no files; export the bundle again");
  if (auto link = has_symlink(root))
    throw Error(root + ": " + *link + " is a symlink; bundles hold no symlinks (copy the file in instead)");
  std::vector<std::string> missing;
  for (const auto& [rel, _] : files)
    if (!is_file(path(rel))) missing.push_back(rel);
  if (!missing.empty()) throw Error(root + ": missing " + join(missing) + "; the bundle is incomplete, export it again");
  if (hashes) {
    std::vector<std::string> changed;
    for (const auto& [rel, digest] : files)
      if (sha256_file(path(rel)) != digest) changed.push_back(rel);
    if (!changed.empty())
      throw Error(root + ": " + join(changed) +
                  " changed since export (sha256 mismatch); export the bundle again, or rebuild engines with `turbotrt build`");
  }
}

bool Bundle::has_graph(const std::string& network) const {
  for (const auto& [n, _] : manifest.graphs)
    if (n == network) return true;
  return false;
}

std::vector<std::string> Bundle::networks() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : manifest.graphs) out.push_back(n);
  return out;
}

const GraphEntry& Bundle::entry(const std::string& network) const {
  for (const auto& [n, g] : manifest.graphs)
    if (n == network) return g;
  throw Error(root + " has no " + network + " graph (it has " + join(networks()) +
              "); export it with that network's checkpoint");
}

std::string Bundle::graph(const std::string& network) const {
  return path(entry(network).file, "graphs." + network + ".file");
}

const GraphSpec& Bundle::spec(const std::string& network) const { return entry(network).spec; }

std::string Bundle::tokenizer() const {
  if (!manifest.tokenizer) throw Error(root + " has no tokenizer; export with --tokenizer spiece.model");
  return path(*manifest.tokenizer, "tokenizer");
}

std::string Bundle::engine(const std::string& network, const std::string& flavour, const std::string& target,
                           const std::string& library_version) const {
  return path(engine_entry(network, flavour, target, library_version).file, "engines." + network);
}

const EngineEntry& Bundle::engine_entry(const std::string& network, const std::string& flavour, const std::string& target,
                                        const std::string& library_version) const {
  std::vector<const EngineEntry*> entries;
  for (const auto& [n, list] : manifest.engines)
    if (n == network)
      for (const auto& e : list)
        if (e.flavour == flavour) entries.push_back(&e);
  std::string runtime = flavour == "tensorrt" ? "" : " --runtime " + flavour;
  std::string rebuild = "run `turbotrt build " + root + runtime + " --target " + target + "` on this machine";
  if (entries.empty()) throw Error(root + ": no " + flavour + " engine for " + network + "; " + rebuild);
  for (const EngineEntry* e : entries)
    if (gpu_fits(*e, target) && library_fits(*e, library_version)) return *e;
  std::vector<std::string> built;
  for (const EngineEntry* e : entries) built.push_back(e->target + " / " + flavour + " " + e->library_version);
  throw Error(root + ": the " + network + " engine was built for " + join(built) + ", but this machine has " + target +
              " / " + flavour + " " + library_version + "; " + rebuild);
}

}  // namespace turbotrt
