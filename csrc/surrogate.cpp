// Fused policy-gradient surrogate: the op's schema (the one TORCH_LIBRARY block), its autograd
// kernel (device independent) and its CPU kernel. The CUDA kernel is in surrogate_cuda.cu; the
// fake kernel is registered from Python (fused_loss.py).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Config.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "surrogate.h"

namespace stable_pg {

// Eager torch.exp on CPU is MKL's VML exp in high-accuracy mode when torch is built with MKL (see
// ATen/cpu/vml.h), else SLEEF through Vectorized<T>::exp. Calling the same functions makes the
// ratios, and so the gradients, equal eager PyTorch's bit for bit. The MKL symbols come from
// libtorch_cpu; they are weak, so a torch that does not export them still loads (and uses SLEEF).
#if AT_MKL_ENABLED() && !defined(__APPLE__)
extern "C" {
void vmsExp(int n, const float* a, float* r, long long mode) __attribute__((weak));
void vmdExp(int n, const double* a, double* r, long long mode) __attribute__((weak));
}
constexpr long long kVmlMode = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
#endif

template <typename T>
static void exp_as_torch(const T* x, T* y, int64_t n) {
#if AT_MKL_ENABLED() && !defined(__APPLE__)
  if constexpr (std::is_same_v<T, float>) {
    if (vmsExp) return vmsExp(int(n), x, y, kVmlMode);
  } else {
    if (vmdExp) return vmdExp(int(n), x, y, kVmlMode);
  }
#endif
  at::vec::map([](at::vec::Vectorized<T> v) { return v.exp(); }, y, x, n);
}

// Chunks are the parallel work unit. Their size is fixed, each is reduced in a fixed order and
// the chunk partials are combined in index order: results do not depend on the thread count.
constexpr int64_t kChunk = 16384;
// Within a chunk, blocks small enough to stay in L1 between the passes below.
constexpr int64_t kBlock = 512;
// Independent accumulators: a fixed summation order that the compiler can still vectorise.
constexpr int64_t kLanes = 8;

template <typename T, int64_t KIND>
static Partial<T> reduce_chunk(const T* __restrict__ nl, const T* __restrict__ ol, const T* __restrict__ adv,
                               T* __restrict__ grad, int64_t n, const Params<T>& P) {
  alignas(64) T lr[kBlock], ratio[kBlock], surr[kBlock], kl[kBlock], eff[kBlock];
  double s[kLanes] = {}, k[kLanes] = {};
  T mx[kLanes], mn[kLanes], me[kLanes];
  const Partial<T> id = identity<T>();
  for (int64_t l = 0; l < kLanes; ++l) mx[l] = id.max_lr, mn[l] = id.min_lr, me[l] = id.max_eff;
  int64_t n_clip = 0, n_nonfinite = 0, n_overflow = 0;

  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    int32_t c_clip = 0, c_nonfinite = 0, c_overflow = 0;
    for (int64_t j = 0; j < m; ++j) lr[j] = nl[b + j] - ol[b + j];
    exp_as_torch(lr, ratio, m);
    for (int64_t j = 0; j < m; ++j) {
      surr[j] = surrogate_and_grad<T, KIND>(nl[b + j], lr[j], ratio[j], adv[b + j], P, grad[b + j]);
      kl[j] = (ratio[j] - T(1)) - lr[j];
      eff[j] = effective_log_ratio<T, KIND>(lr[j], adv[b + j], P);
      c_clip += is_clipped(lr[j], P);
      c_nonfinite += any_nonfinite(nl[b + j], ol[b + j], adv[b + j]);
      c_overflow += overflowed(lr[j], ratio[j]);
    }
    n_clip += c_clip, n_nonfinite += c_nonfinite, n_overflow += c_overflow;
    // Pad the last block to whole lanes with neutral values (max/min: repeat an element).
    const int64_t mp = (m + kLanes - 1) / kLanes * kLanes;
    for (int64_t j = m; j < mp; ++j) surr[j] = kl[j] = T(0), lr[j] = lr[0], eff[j] = eff[0];
    for (int64_t j = 0; j < mp; j += kLanes)
#pragma omp simd  // lanes are independent: vectorising across them reorders nothing
      for (int64_t l = 0; l < kLanes; ++l) {
        s[l] += double(surr[j + l]);
        k[l] += double(kl[j + l]);
        mx[l] = nan_max(mx[l], lr[j + l]);
        mn[l] = nan_min(mn[l], lr[j + l]);
        me[l] = nan_max(me[l], eff[j + l]);
      }
  }
  Partial<T> p = id;
  for (int64_t l = 0; l < kLanes; ++l) combine(p, Partial<T>{s[l], k[l], mx[l], mn[l], me[l], 0, 0, 0});
  p.n_clip = n_clip, p.n_nonfinite = n_nonfinite, p.n_overflow = n_overflow;
  return p;
}

template <typename T, int64_t KIND>
static void run(const T* nl, const T* ol, const T* adv, T* grad, int64_t n, const Params<T>& P,
                T* loss, T* fstats, int64_t* istats) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<Partial<T>> parts(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i = c * kChunk;
      parts[c] = reduce_chunk<T, KIND>(nl + i, ol + i, adv + i, grad + i, std::min(kChunk, n - i), P);
    }
  });
  Partial<T> total = identity<T>();
  for (const auto& p : parts) combine(total, p);
  finish(total, n, loss, fstats, istats);
}

Outputs surrogate_fwd_cpu(
    const at::Tensor& new_logp, const at::Tensor& old_logp, const at::Tensor& adv, double clip_coef,
    int64_t kind) {
  const Call c = prepare(new_logp, old_logp, adv, kind);
  AT_DISPATCH_FLOATING_TYPES(c.nl.scalar_type(), "surrogate_fwd_cpu", [&] {
    const auto P = make_params<scalar_t>(clip_coef, c.n);
    dispatch_kind(kind, [&](auto k) {
      run<scalar_t, decltype(k)::value>(c.nl.const_data_ptr<scalar_t>(), c.ol.const_data_ptr<scalar_t>(),
                                        c.adv.const_data_ptr<scalar_t>(), c.grad.mutable_data_ptr<scalar_t>(), c.n,
                                        P, c.loss.mutable_data_ptr<scalar_t>(),
                                        c.fstats.mutable_data_ptr<scalar_t>(), c.istats.mutable_data_ptr<int64_t>());
    });
  });
  return c.outputs();
}

// The forward already produced d loss / d new_logp, so the backward is one multiply. Autograd is
// registered here rather than with torch.library.register_autograd, whose Python path costs tens of
// microseconds per call: more than the kernel itself up to N ~ 10^4 on CPU, and the whole of it on a GPU.
struct SurrogateFunction : public torch::autograd::Function<SurrogateFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& new_logp,
                                                const at::Tensor& old_logp, const at::Tensor& adv, double clip_coef,
                                                int64_t kind) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("stable_pg::surrogate_fwd", "")
                               .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
    auto [loss, grad, fstats, istats] = op.call(new_logp, old_logp, adv, clip_coef, kind);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad, fstats, istats});
    // else autograd hands the backward zero-filled gradients for the other three outputs, one N long
    ctx->set_materialize_grads(false);
    return {loss, grad, fstats, istats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The saved gradient is a constant here, so a second derivative would silently be zero.
    TORCH_CHECK(!at::GradMode::is_enabled(), "stable_pg::surrogate_fwd does not support double backward "
                "(create_graph=True); use backend='reference'");
    // A loss that got no gradient (grads are not materialised) passes none on; old_logp and
    // advantages are constants, like .detach() in the reference.
    const at::Tensor& grad_loss = grads[0];
    return {grad_loss.defined() ? at::mul(grad_loss, ctx->get_saved_variables()[0]) : at::Tensor(), {}, {}, {}, {}};
  }
};

Outputs surrogate_fwd_autograd(const at::Tensor& new_logp, const at::Tensor& old_logp, const at::Tensor& adv,
                               double clip_coef, int64_t kind) {
  auto out = SurrogateFunction::apply(new_logp, old_logp, adv, clip_coef, kind);
  return {out[0], out[1], out[2], out[3]};
}

// fstats = [max_log_ratio, min_log_ratio, max_log_ratio_effective, clip_frac, approx_kl]
// istats = [n_nonfinite, n_overflow]; grad = d loss / d new_logp, saved for the backward.
TORCH_LIBRARY(stable_pg, m) {
  m.def("surrogate_fwd(Tensor new_logp, Tensor old_logp, Tensor adv, float clip_coef, int kind)"
        " -> (Tensor loss, Tensor grad, Tensor fstats, Tensor istats)",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(stable_pg, Autograd, m) { m.impl("surrogate_fwd", &surrogate_fwd_autograd); }
TORCH_LIBRARY_IMPL(stable_pg, CPU, m) { m.impl("surrogate_fwd", &surrogate_fwd_cpu); }

}  // namespace stable_pg
