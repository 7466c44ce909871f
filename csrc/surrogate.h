// Per-element math of the fused surrogate, shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// Every line mirrors one eager PyTorch op of fused_loss.surrogate_reference and of its autograd
// backward, rounded in the input dtype in the same order, so the gradient matches the reference's
// elementwise (minimum's half-gradient on ties, clamp's inclusive bounds, 0 * inf = NaN, ...).
// Nothing here may be contracted into FMAs or reassociated: built with -ffp-contract=off / --fmad=false.
// Also here, once for both kernels: the op's internal checks and its output allocation (prepare()).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace stable_pg {

enum Kind : int64_t { PPO = 0, CPG = 1, IS = 2, VPG = 3 };

// The op's stat vectors, in the order of fused_loss.FLOAT_STATS and fused_loss.INT_STATS.
enum FloatStat : int64_t { MAX_LOG_RATIO, MIN_LOG_RATIO, MAX_LOG_RATIO_EFFECTIVE, CLIP_FRAC, APPROX_KL, kNumFloatStats };
enum IntStat : int64_t { N_NONFINITE, N_OVERFLOW, kNumIntStats };

// (loss, grad = d loss / d new_logp, fstats, istats)
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One call of the op: its inputs made contiguous and its outputs allocated, on the inputs' device.
struct Call {
  at::Tensor nl, ol, adv;
  int64_t n;
  at::Tensor loss, grad, fstats, istats;
  Outputs outputs() const { return {loss, grad, fstats, istats}; }
};

// Input validation lives in Python (fused_loss._check, shared by both backends); these are internal
// consistency checks of what reaches a kernel.
inline Call prepare(const at::Tensor& new_logp, const at::Tensor& old_logp, const at::Tensor& adv, int64_t kind) {
  TORCH_CHECK(new_logp.dim() == 1 && new_logp.sizes() == old_logp.sizes() && new_logp.sizes() == adv.sizes());
  TORCH_CHECK(new_logp.numel() > 0 && kind >= PPO && kind <= VPG);
  TORCH_CHECK(old_logp.scalar_type() == new_logp.scalar_type() && adv.scalar_type() == new_logp.scalar_type());
  TORCH_CHECK(old_logp.device() == new_logp.device() && adv.device() == new_logp.device());
  Call c{new_logp.contiguous(), old_logp.contiguous(), adv.contiguous(), new_logp.numel()};
  const auto options = c.nl.options();
  c.loss = at::empty({}, options);
  c.grad = at::empty({c.n}, options);
  c.fstats = at::empty({kNumFloatStats}, options);
  c.istats = at::empty({kNumIntStats}, options.dtype(at::kLong));
  return c;
}

// Thresholds computed once on the host with the same libm calls as the Python reference, then
// rounded to the input dtype exactly as PyTorch rounds a Python scalar operand.
template <typename T>
struct Params {
  T g0;                  // d loss / d surr_i = -1 / N (MeanBackward of -surr.mean())
  T lo, hi;              // ppo: clamp bounds of the ratio, 1 -/+ eps
  T log_lo, log_hi;      // cpg clamp bounds and effective-ratio caps: log(1 -/+ eps)
  T clip_lo, clip_hi;    // clip_frac thresholds: log1p(-/+ eps)
};

template <typename T>
inline Params<T> make_params(double eps, int64_t n) {
  return {T(-1) / T(n), T(1.0 - eps), T(1.0 + eps), T(std::log(1.0 - eps)),
          T(std::log(1.0 + eps)), T(std::log1p(-eps)), T(std::log1p(eps))};
}

// Calls f(std::integral_constant<int64_t, KIND>{}): one branch-free kernel instance per kind.
template <typename F>
inline void dispatch_kind(int64_t kind, F&& f) {
  switch (kind) {
    case PPO: f(std::integral_constant<int64_t, PPO>{}); break;
    case CPG: f(std::integral_constant<int64_t, CPG>{}); break;
    case IS: f(std::integral_constant<int64_t, IS>{}); break;
    default: f(std::integral_constant<int64_t, VPG>{});
  }
}

// Reduction state of a chunk / block: sums in double, max/min NaN-propagating like torch.max.
// A CUDA thread, which sees few elements, counts in 32 bits (cheaper); partials count in 64.
template <typename T, typename Count = int64_t>
struct Partial {
  double surr, kl;
  T max_lr, min_lr, max_eff;
  Count n_clip, n_nonfinite, n_overflow;
};

template <typename T>
C10_HOST_DEVICE inline T nan_max(T a, T b) { return (b > a) | (b != b) ? b : a; }
template <typename T>
C10_HOST_DEVICE inline T nan_min(T a, T b) { return (b < a) | (b != b) ? b : a; }

template <typename T, typename Count = int64_t>
C10_HOST_DEVICE inline Partial<T, Count> identity() {
  const T inf = std::numeric_limits<T>::infinity();
  return {0.0, 0.0, -inf, inf, -inf, 0, 0, 0};
}

// Order matters only for the double sums; callers combine partials in a fixed order.
template <typename T>
C10_HOST_DEVICE inline void combine(Partial<T>& a, const Partial<T>& b) {
  a.surr += b.surr;
  a.kl += b.kl;
  a.max_lr = nan_max(a.max_lr, b.max_lr);
  a.min_lr = nan_min(a.min_lr, b.min_lr);
  a.max_eff = nan_max(a.max_eff, b.max_eff);
  a.n_clip += b.n_clip;
  a.n_nonfinite += b.n_nonfinite;
  a.n_overflow += b.n_overflow;
}

// torch.clamp and torch.minimum forward: NaN in, NaN out.
template <typename T>
C10_HOST_DEVICE inline T clamp(T x, T lo, T hi) { return x != x ? x : (x < lo ? lo : (x > hi ? hi : x)); }
template <typename T>
C10_HOST_DEVICE inline T minimum(T a, T b) {
  const T nan = a + b;  // only used when one is NaN
  return (a != a) | (b != b) ? nan : (a < b ? a : b); }

// min(a(x), b(x)) with a = x * adv, b = clamp(x, lo, hi) * adv: value and d/dx given upstream g.
// minimum backward: grad/2 to each side on ties, grad to the smaller side (both sides when NaN);
// clamp backward: grad where lo <= x <= hi, else 0; the two paths into x are summed by autograd.
template <typename T>
C10_HOST_DEVICE inline T clipped_min(T x, T adv, T lo, T hi, T g, T& grad_x) {
  const T a = x * adv, b = clamp(x, lo, hi) * adv;
  const T half = g / T(2);
  const T gs = a == b ? half : g;
  const T ga = a > b ? T(0) : gs, gb = a < b ? T(0) : gs;
  const T ta = ga * adv, tb = gb * adv;
  grad_x = ta + ((x >= lo) & (x <= hi) ? tb : T(0));
  return minimum(a, b);
}

// Surrogate value of one element and d loss / d new_logp (grad), given lr = new - old, ratio = exp(lr).
template <typename T, int64_t KIND>
C10_HOST_DEVICE inline T surrogate_and_grad(T new_lp, T lr, T ratio, T adv, const Params<T>& P, T& grad) {
  if (KIND == PPO) {
    T g_ratio;
    const T surr = clipped_min(ratio, adv, P.lo, P.hi, P.g0, g_ratio);
    grad = g_ratio * ratio;  // ExpBackward: grad * result
    return surr;
  } else if (KIND == CPG) {
    return clipped_min(lr, adv, P.log_lo, P.log_hi, P.g0, grad);
  } else if (KIND == IS) {
    grad = (P.g0 * adv) * ratio;
    return ratio * adv;
  } else {
    grad = P.g0 * adv;
    return new_lp * adv;
  }
}

// The log of the ratio as the clipped objective sees it: capped above for adv >= 0, below otherwise.
template <typename T, int64_t KIND>
C10_HOST_DEVICE inline T effective_log_ratio(T lr, T adv, const Params<T>& P) {
  const T inf = std::numeric_limits<T>::infinity();
  if (KIND != PPO && KIND != CPG) return lr;
  const T capped = clamp(lr, -inf, P.log_hi), floored = clamp(lr, P.log_lo, inf);
  return adv >= T(0) ? capped : floored;
}

template <typename T>
C10_HOST_DEVICE inline bool is_clipped(T lr, const Params<T>& P) { return (lr > P.clip_hi) | (lr < P.clip_lo); }
template <typename T>
C10_HOST_DEVICE inline bool any_nonfinite(T a, T b, T c) { return !(std::isfinite(a) & std::isfinite(b) & std::isfinite(c)); }
template <typename T>
C10_HOST_DEVICE inline bool overflowed(T lr, T ratio) { return std::isfinite(lr) & std::isinf(ratio); }

// One element: writes d loss / d new_logp and folds the surrogate and the stats into p.
template <typename T, int64_t KIND, typename Count>
C10_HOST_DEVICE inline void element(T new_lp, T old_lp, T adv, const Params<T>& P, T& grad, Partial<T, Count>& p) {
  const T lr = new_lp - old_lp;
  const T ratio = std::exp(lr);
  p.surr += double(surrogate_and_grad<T, KIND>(new_lp, lr, ratio, adv, P, grad));
  p.kl += double((ratio - T(1)) - lr);
  p.max_lr = nan_max(p.max_lr, lr);
  p.min_lr = nan_min(p.min_lr, lr);
  p.max_eff = nan_max(p.max_eff, effective_log_ratio<T, KIND>(lr, adv, P));
  p.n_clip += is_clipped(lr, P);
  p.n_nonfinite += any_nonfinite(new_lp, old_lp, adv);
  p.n_overflow += overflowed(lr, ratio);
}

// Final values in the input dtype. Rounding the double sum to T before dividing keeps the
// reference's overflow: a float32 sum past FLT_MAX is inf there, so it is inf here too.
template <typename T>
C10_HOST_DEVICE inline void finish(const Partial<T>& p, int64_t n, T* loss, T* fstats, int64_t* istats) {
  const T nt = T(n);
  *loss = -(T(p.surr) / nt);
  fstats[MAX_LOG_RATIO] = p.max_lr;
  fstats[MIN_LOG_RATIO] = p.min_lr;
  fstats[MAX_LOG_RATIO_EFFECTIVE] = p.max_eff;
  fstats[CLIP_FRAC] = T(p.n_clip) / nt;
  fstats[APPROX_KL] = T(p.kl) / nt;
  istats[N_NONFINITE] = p.n_nonfinite;
  istats[N_OVERFLOW] = p.n_overflow;
}

}  // namespace stable_pg
