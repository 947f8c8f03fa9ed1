// Native CPU kernels of the fused SDE step (fgrpo.kernels.sde): forward (mean, next sample,
// per-sample log-prob) and backward (grads w.r.t. x and v), one pass over memory each.
//
// The math and its per-sample scalars follow fgrpo/sde.py in the same fp32 order; see
// kernels/sde.py for the op contract. Elements are split into fixed-size chunks so the
// log-prob sum depends on the shape only, never on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)
constexpr int64_t kChunk = 8192;                         // elements per parallel task
constexpr int64_t kSde = 0, kCps = 1;

// Per-sample scalars. mean = x + (v + c * (x + (1 - s) v)) dt for "sde" (c = std_t^2 / 2s),
// mean = (1 - sn)(x - s v) + c (x + (1 - s) v) for "cps" (c = sqrt(sn^2 - std^2)).
struct Step {
  float s, sn, dt, c, std, cx, cv;  // cx, cv: d mean / d x, d mean / d v
};

Step make_step(float s, float sn, float a, float sin_term, int64_t kind) {
  Step p{};
  p.s = s;
  p.sn = sn;
  p.dt = sn - s;
  if (kind == kSde) {
    float denom = s >= 1.f ? 1.f - sn : 1.f - s;
    float std_t = a * std::sqrt(s / denom);
    p.c = std_t * std_t / (2.f * s);
    p.std = std_t * std::sqrt(-p.dt);
    p.cx = 1.f + p.c * p.dt;
    p.cv = (1.f + p.c * (1.f - s)) * p.dt;
  } else {
    p.std = sn * sin_term;
    p.c = std::sqrt(std::max(sn * sn - p.std * p.std, 0.f));
    p.cx = (1.f - sn) + p.c;
    p.cv = -(1.f - sn) * s + p.c * (1.f - s);
  }
  return p;
}

template <int64_t KIND>
inline float step_mean(float x, float v, const Step& p) {
  if constexpr (KIND == kSde) {
    return x + (v + p.c * (x + (1.f - p.s) * v)) * p.dt;
  } else {
    return (1.f - p.sn) * (x - p.s * v) + p.c * (x + (1.f - p.s) * v);
  }
}

// One chunk of the forward pass; returns sum((next - mean)^2) over the chunk.
// SAMPLE: next = mean + std * noise is written; otherwise `in` is the given next sample.
template <int64_t KIND, bool SAMPLE, typename VT>
float forward_chunk(const float* x, const VT* v, const float* in, float* next, float* mean, int64_t n,
                    const Step& p) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    float m = step_mean<KIND>(x[i], static_cast<float>(v[i]), p);
    mean[i] = m;
    float nx;
    if constexpr (SAMPLE) {
      nx = m + p.std * in[i];
      next[i] = nx;
    } else {
      nx = in[i];
    }
    float d = nx - m;
    acc += d * d;
  }
  return acc;
}

// One chunk of the backward pass: g = grad_mean + scale * (next - mean), gx = cx g, gv = cv g.
template <int64_t KIND, bool HAS_GM, bool HAS_GL, bool NEED_X, typename VT>
void backward_chunk(const float* gm, float scale, const float* x, const VT* v, const float* nx, float* gx, VT* gv,
                    int64_t n, const Step& p) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float g = 0.f;
    if constexpr (HAS_GM) g = gm[i];
    if constexpr (HAS_GL) g += scale * (nx[i] - step_mean<KIND>(x[i], static_cast<float>(v[i]), p));
    if constexpr (NEED_X) gx[i] = p.cx * g;
    gv[i] = static_cast<VT>(p.cv * g);
  }
}

template <typename F>
void dispatch_v(const at::Tensor& v, F&& f) {
  switch (v.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "fgrpo_native: v must be float32, bfloat16 or float16, got ", v.scalar_type());
  }
}

template <typename F>
void dispatch_kind(int64_t kind, F&& f) {
  TORCH_CHECK(kind == kSde || kind == kCps, "fgrpo_native: kind must be 0 (sde) or 1 (cps), got ", kind);
  if (kind == kSde) return f(std::integral_constant<int64_t, kSde>{});
  return f(std::integral_constant<int64_t, kCps>{});
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::vector<Step> make_steps(const at::Tensor& sigma, const at::Tensor& sigma_next, double noise_level,
                             int64_t kind) {
  auto s = as_float(sigma), sn = as_float(sigma_next);
  const float a = static_cast<float>(noise_level);
  const float sin_term = static_cast<float>(std::sin(noise_level * M_PI / 2));
  std::vector<Step> steps(s.numel());
  for (int64_t b = 0; b < s.numel(); ++b)
    steps[b] = make_step(s.data_ptr<float>()[b], sn.data_ptr<float>()[b], a, sin_term, kind);
  return steps;
}

void check_inputs(const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sigma_next) {
  TORCH_CHECK(x.device().is_cpu() && v.device().is_cpu(), "fgrpo_native: tensors must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == v.sizes(), "fgrpo_native: x and v must have the same shape (B, ...)");
  TORCH_CHECK(sigma.numel() == x.size(0) && sigma_next.numel() == x.size(0),
              "fgrpo_native: sigma and sigma_next must have shape (B,)");
}

// Returns (next_sample or an empty tensor when next_sample is given, log_prob (B,), mean, std (B,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sde_step_fwd(
    const at::Tensor& x_in, const at::Tensor& v_in, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& next_sample, double noise_level,
    int64_t kind, bool mean_reduce) {
  check_inputs(x_in, v_in, sigma, sigma_next);
  TORCH_CHECK(noise.has_value() != next_sample.has_value(), "fgrpo_native: give exactly one of noise, next_sample");
  const bool sample = noise.has_value();
  auto x = as_float(x_in);
  auto v = v_in.contiguous();
  auto in = as_float(sample ? *noise : *next_sample);
  TORCH_CHECK(in.sizes() == x.sizes(), "fgrpo_native: noise/next_sample must have the shape of x");
  const int64_t B = x.size(0), N = B ? x.numel() / B : 0;
  const int64_t chunks = std::max<int64_t>((N + kChunk - 1) / kChunk, 1);
  auto opts = x.options().dtype(at::kFloat);
  auto mean = at::empty(x.sizes(), opts);
  auto next = sample ? at::empty(x.sizes(), opts) : at::empty({0}, opts);
  auto log_prob = at::empty({B}, opts), std_out = at::empty({B}, opts);
  const auto steps = make_steps(sigma, sigma_next, noise_level, kind);
  std::vector<float> partial(B * chunks, 0.f);

  const float* xp = x.data_ptr<float>();
  const float* inp = in.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* np_ = sample ? next.data_ptr<float>() : nullptr;
  dispatch_kind(kind, [&](auto kind_c) {
    constexpr int64_t K = decltype(kind_c)::value;
    dispatch_v(v, [&](auto vt) {
      using VT = decltype(vt);
      const VT* vp = v.data_ptr<VT>();
      at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / chunks, lo = b * N + (t % chunks) * kChunk;
          const int64_t n = std::min(kChunk, b * N + N - lo);
          if (n <= 0) continue;
          partial[t] = sample ? forward_chunk<K, true>(xp + lo, vp + lo, inp + lo, np_ + lo, mp + lo, n, steps[b])
                              : forward_chunk<K, false>(xp + lo, vp + lo, inp + lo, nullptr, mp + lo, n, steps[b]);
        }
      });
    });
  });

  for (int64_t b = 0; b < B; ++b) {
    const Step& p = steps[b];
    std_out.data_ptr<float>()[b] = p.std;
    double ss = 0.0;  // chunk partials summed in a fixed order: deterministic
    for (int64_t c = 0; c < chunks; ++c) ss += partial[b * chunks + c];
    double lp = 0.0;
    if (noise_level != 0.0) {
      if (kind == kSde) {
        const double safe = std::max(p.std, FLT_MIN);
        lp = -ss / (2.0 * safe * safe) - N * (std::log(safe) + kLogSqrt2Pi);
      } else {
        lp = -ss;
      }
      if (mean_reduce) lp /= static_cast<double>(N);
    }
    log_prob.data_ptr<float>()[b] = static_cast<float>(lp);
  }
  return {next, log_prob, mean, std_out};
}

// Returns (grad_x, or an empty tensor unless need_x, grad_v in v's dtype).
std::tuple<at::Tensor, at::Tensor> sde_step_bwd(const std::optional<at::Tensor>& grad_log_prob,
                                                const std::optional<at::Tensor>& grad_mean, const at::Tensor& x_in,
                                                const at::Tensor& v_in, const at::Tensor& sigma,
                                                const at::Tensor& sigma_next, const at::Tensor& next_sample,
                                                double noise_level, int64_t kind, bool mean_reduce, bool need_x) {
  check_inputs(x_in, v_in, sigma, sigma_next);
  auto x = as_float(x_in);
  auto v = v_in.contiguous();
  auto nx = as_float(next_sample);
  const int64_t B = x.size(0), N = B ? x.numel() / B : 0;
  const int64_t chunks = std::max<int64_t>((N + kChunk - 1) / kChunk, 1);
  const bool has_gm = grad_mean.has_value();
  const bool has_gl = grad_log_prob.has_value() && noise_level != 0.0;  // log_prob is constant 0 at noise 0
  at::Tensor gm = has_gm ? as_float(*grad_mean) : at::Tensor();
  at::Tensor gl = has_gl ? as_float(*grad_log_prob) : at::Tensor();
  auto gx = at::empty(need_x ? x.sizes() : at::IntArrayRef{0}, x.options());
  auto gv = at::empty(v.sizes(), v.options());
  const auto steps = make_steps(sigma, sigma_next, noise_level, kind);
  std::vector<float> scale(B, 0.f);  // d log_prob / d mean = scale * (next - mean), times grad_log_prob
  for (int64_t b = 0; b < B && has_gl; ++b) {
    const float safe = std::max(steps[b].std, FLT_MIN);
    float k = kind == kSde ? 1.f / (safe * safe) : 2.f;
    if (mean_reduce) k /= static_cast<float>(N);
    scale[b] = gl.data_ptr<float>()[b] * k;
  }

  const float* xp = x.data_ptr<float>();
  const float* nxp = nx.data_ptr<float>();
  const float* gmp = has_gm ? gm.data_ptr<float>() : nullptr;
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  dispatch_kind(kind, [&](auto kind_c) {
    constexpr int64_t K = decltype(kind_c)::value;
    dispatch_v(v, [&](auto vt) {
      using VT = decltype(vt);
      const VT* vp = v.data_ptr<VT>();
      VT* gvp = gv.data_ptr<VT>();
      auto run = [&](auto has_gm_c, auto has_gl_c, auto need_x_c) {
        at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const int64_t b = t / chunks, lo = b * N + (t % chunks) * kChunk;
            const int64_t n = std::min(kChunk, b * N + N - lo);
            if (n <= 0) continue;
            backward_chunk<K, decltype(has_gm_c)::value, decltype(has_gl_c)::value, decltype(need_x_c)::value>(
                gmp + (has_gm ? lo : 0), scale[b], xp + lo, vp + lo, nxp + lo, gxp + (need_x ? lo : 0), gvp + lo,
                n, steps[b]);
          }
        });
      };
      using T = std::true_type;
      using F = std::false_type;
      // 8 specialisations keep the inner loop branch-free.
      if (has_gm && has_gl && need_x) run(T{}, T{}, T{});
      else if (has_gm && has_gl) run(T{}, T{}, F{});
      else if (has_gm && need_x) run(T{}, F{}, T{});
      else if (has_gm) run(T{}, F{}, F{});
      else if (has_gl && need_x) run(F{}, T{}, T{});
      else if (has_gl) run(F{}, T{}, F{});
      else if (need_x) run(F{}, F{}, T{});
      else run(F{}, F{}, F{});
    });
  });
  if (need_x && x_in.scalar_type() != at::kFloat) gx = gx.to(x_in.scalar_type());
  return {gx, gv};
}

}  // namespace

TORCH_LIBRARY(fgrpo_native, m) {
  m.def(
      "sde_step_fwd(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor? noise, Tensor? next_sample, "
      "float noise_level, int kind, bool mean_reduce) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sde_step_bwd(Tensor? grad_log_prob, Tensor? grad_mean, Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, "
      "Tensor next_sample, float noise_level, int kind, bool mean_reduce, bool need_x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fgrpo_native, CPU, m) {
  m.impl("sde_step_fwd", &sde_step_fwd);
  m.impl("sde_step_bwd", &sde_step_bwd);
}
