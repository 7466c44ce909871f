// Per-element math of the fused surrogate, shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// Every line mirrors one eager PyTorch op of fused_loss.surrogate_reference and of its autograd
// backward, rounded in the input dtype in the same order, so the gradient matches the reference's
// elementwise (minimum's half-gradient on ties, clamp's inclusive bounds, 0 * inf = NaN, ...).
// Nothing here may be contracted into FMAs or reassociated: built with -ffp-contract=off / --fmad=false.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace stable_pg {

enum Kind : int64_t { PPO = 0, CPG = 1, IS = 2, VPG = 3 };

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
template <typename T>
struct Partial {
  double surr, kl;
  T max_lr, min_lr, max_eff;
  int64_t n_clip, n_nonfinite, n_overflow;
};

template <typename T>
C10_HOST_DEVICE inline T nan_max(T a, T b) { return (b > a) | (b != b) ? b : a; }
template <typename T>
C10_HOST_DEVICE inline T nan_min(T a, T b) { return (b < a) | (b != b) ? b : a; }

template <typename T>
C10_HOST_DEVICE inline Partial<T> identity() {
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
template <typename T, int64_t KIND>
C10_HOST_DEVICE inline void element(T new_lp, T old_lp, T adv, const Params<T>& P, T& grad, Partial<T>& p) {
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
  fstats[0] = p.max_lr;
  fstats[1] = p.min_lr;
  fstats[2] = p.max_eff;
  fstats[3] = T(p.n_clip) / nt;
  fstats[4] = T(p.kl) / nt;
  istats[0] = p.n_nonfinite;
  istats[1] = p.n_overflow;
}

}  // namespace stable_pg
