// turbotrt_check: the library's parts one at a time, for tests/test_cpp.py to compare with Python.
//
//   turbotrt_check philox C0 C1 C2 C3 K0 K1         Philox4x32-10 of one counter (hex words)
//   turbotrt_check noise SEED DRAW COUNT OUT.npy      noise.normal(seed, draw, count)
//   turbotrt_check schedule STEPS SIGMA_MAX DIM PREFIX
//                                                    PREFIX.times.npy (f8), .net.npy (f4), .sin.npy (f4)
//   turbotrt_check tokenize MODEL TEXT_LEN < prompts.json
//                                                    [{"ids": [...], "clean": str, "approximate": bool}, ...]
//   turbotrt_check sha256 FILE                        the digest (as bundles are hashed) and the portable code's
//   turbotrt_check load BUNDLE [--no-verify]          "ok", or the refusal on stderr (exit 1)
//   turbotrt_check engine BUNDLE NETWORK FLAVOUR TARGET VERSION
//                                                    the engine's path, or the refusal (exit 1)
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "files.hpp"
#include "json_util.hpp"
#include "noise.hpp"
#include "npy.hpp"
#include "rcm.hpp"
#include "sha256.hpp"
#include "tokenizer.hpp"

using namespace turbotrt;

namespace {

void save(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape, const void* data,
          size_t bytes) {
  auto raw = npy_bytes(descr, shape, data, bytes);
  write_atomic(path, raw.data(), raw.size());
}

int run(const std::vector<std::string>& a) {
  const std::string cmd = a.empty() ? "" : a[0];
  if (cmd == "philox" && a.size() == 7) {
    std::array<uint32_t, 4> c;
    for (int i = 0; i < 4; ++i) c[size_t(i)] = uint32_t(std::stoul(a[size_t(i) + 1], nullptr, 16));
    auto x = philox4x32_10(c, {uint32_t(std::stoul(a[5], nullptr, 16)), uint32_t(std::stoul(a[6], nullptr, 16))});
    std::printf("%08x %08x %08x %08x\n", x[0], x[1], x[2], x[3]);
    return 0;
  }
  if (cmd == "noise" && a.size() == 5) {
    size_t count = std::stoull(a[3]);
    std::vector<float> v(count);
    normal(std::stoull(a[1]), uint32_t(std::stoul(a[2])), count, v.data());
    save(a[4], "<f4", {int64_t(count)}, v.data(), count * 4);
    return 0;
  }
  if (cmd == "schedule" && a.size() == 5) {
    int steps = std::stoi(a[1]), dim = std::stoi(a[3]);
    auto times = rcm_times(steps, std::stod(a[2]));
    auto net = net_timesteps(times);
    std::vector<float> sin;
    for (float t : net) {
      auto s = timestep_sinusoid(t, dim);
      sin.insert(sin.end(), s.begin(), s.end());
    }
    save(a[4] + ".times.npy", "<f8", {int64_t(times.size())}, times.data(), times.size() * 8);
    save(a[4] + ".net.npy", "<f4", {int64_t(net.size())}, net.data(), net.size() * 4);
    save(a[4] + ".sin.npy", "<f4", {int64_t(net.size()), dim}, sin.data(), sin.size() * 4);
    return 0;
  }
  if (cmd == "tokenize" && a.size() == 3) {
    Tokenizer tok(a[1], std::stoll(a[2]));
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    Json out = Json::array();
    for (const auto& prompt : Json::parse(input)) {
      std::vector<int64_t> ids, mask;
      tok(prompt.get<std::string>(), ids, mask);
      const std::string text = prompt.get<std::string>();
      out.push_back({{"ids", ids}, {"clean", clean_text(text)}, {"approximate", cleaning_is_approximate(text)}});
    }
    std::cout << out.dump() << "\n";
    return 0;
  }
  if (cmd == "sha256" && a.size() == 2) {
    auto raw = read_file(a[1]);
    PortableSha256 portable;
    portable.update(raw.data(), raw.size());
    std::cout << sha256_file(a[1]) << " " << portable.hexdigest() << " " << Sha256::implementation() << "\n";
    return 0;
  }
  if (cmd == "load" && (a.size() == 2 || (a.size() == 3 && a[2] == "--no-verify"))) {
    Bundle::load(a[1], a.size() == 2);
    std::cout << "ok\n";
    return 0;
  }
  if (cmd == "engine" && a.size() == 6) {
    Bundle b = Bundle::load(a[1], false);
    std::cout << b.engine(a[2], a[3], a[4], a[5]) << "\n";
    return 0;
  }
  std::cerr << "usage: see the comment at the top of cpp/tests/check.cpp\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const Error& e) {
    std::cerr << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "unexpected failure: " << e.what() << "\n";
    return 2;
  }
}
