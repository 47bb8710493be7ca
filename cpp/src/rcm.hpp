// The rCM few-step schedule and updates in float64, as turbotrt/core/rcm.py computes them
// (upstream: TurboDiffusion's rcm/ sampler).
#pragma once

#include <string>
#include <vector>

namespace turbotrt {

constexpr int MAX_STEPS = 4;

int validate_steps(long long steps);  // 1..4, else Error
// steps+1 rectified-flow times from t(sigma_max) down to 0: t = sin(a) / (cos(a) + sin(a)).
std::vector<double> rcm_times(int steps, double sigma_max);
// Round a float32 to the nearest bfloat16 (ties to even), returned as float32.
float round_bf16(float x);
// What the network sees at each step: bf16(fp32(t) * 1000) for every t but the final 0.
std::vector<float> net_timesteps(const std::vector<double>& times);
// The DiT's t_freq input: cat([cos, sin]) of t * 10000^(-i/(dim/2)) in float64, as float32 [dim].
std::vector<float> timestep_sinusoid(float t, int dim);
// I2V A14B: the high-noise expert while t >= boundary, then the low-noise one ("" for one DiT).
std::string expert_for_step(double t_cur, double boundary, const std::vector<std::string>& experts);

}  // namespace turbotrt
