#include "rcm.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>

#include "turbotrt/turbotrt.hpp"

namespace turbotrt {

namespace {
const double MID_ANGLES[] = {1.5, 1.4, 1.0};  // intermediate angles of the distilled schedule, radians
}

int validate_steps(long long steps) {
  if (steps < 1 || steps > MAX_STEPS)
    throw Error("rCM samples in 1 to 4 steps; got " + std::to_string(steps));
  return int(steps);
}

std::vector<double> rcm_times(int steps, double sigma_max) {
  validate_steps(steps);
  if (!(sigma_max > 0)) throw Error("sigma_max must be positive");
  std::vector<double> angles{std::atan(sigma_max)};
  for (int i = 0; i < steps - 1; ++i) angles.push_back(MID_ANGLES[i]);
  angles.push_back(0.0);
  std::vector<double> t;
  for (double a : angles) t.push_back(std::sin(a) / (std::cos(a) + std::sin(a)));
  return t;
}

float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint64_t v = (uint64_t(u) + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  uint32_t r = uint32_t(v);
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

std::vector<float> net_timesteps(const std::vector<double>& times) {
  std::vector<float> out;
  for (size_t i = 0; i + 1 < times.size(); ++i)
    out.push_back(round_bf16(float(double(float(times[i])) * 1000.0)));
  return out;
}

std::vector<float> timestep_sinusoid(float t, int dim) {
  int half = dim / 2;
  std::vector<float> out(size_t(2 * half));
  for (int i = 0; i < half; ++i) {
    double angle = double(t) * std::pow(10000.0, -double(i) / half);
    out[size_t(i)] = float(std::cos(angle));
    out[size_t(half + i)] = float(std::sin(angle));
  }
  return out;
}

std::string expert_for_step(double t_cur, double boundary, const std::vector<std::string>& experts) {
  if (experts.empty()) return "";
  return t_cur >= boundary ? experts[0] : experts[1];
}

}  // namespace turbotrt
