// CUDA kernel of stable_pg::surrogate_fwd (schema in surrogate.cpp, per-element math in surrogate.h).
//
// Deterministic two-pass reduction, no atomics: pass 1 runs a grid-stride loop whose grid size
// depends only on N, so every thread always sees the same elements; each block tree-reduces its
// threads in shared memory and writes one partial. Pass 2, a single block, reduces the partials
// in a fixed order and writes the outputs. Sums are accumulated in double.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "surrogate.h"

namespace stable_pg {

constexpr int kThreads = 256;       // power of two: the tree reduction below halves it
// Enough blocks for several waves on any current GPU, so the last, partly filled wave costs
// little; the grid still depends on N alone, so results do not depend on the device.
constexpr int64_t kMaxBlocks = 4096;

// Fixed pairing tree over the block's threads; the result lands in sh[0].
template <typename T>
__device__ void block_reduce(Partial<T>* sh, const Partial<T>& p) {
  sh[threadIdx.x] = p;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) combine(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
}

template <typename T, int64_t KIND>
__global__ void __launch_bounds__(kThreads)
partials_kernel(const T* __restrict__ nl, const T* __restrict__ ol, const T* __restrict__ adv,
                T* __restrict__ grad, int64_t n, Params<T> P, Partial<T>* __restrict__ parts) {
  __shared__ Partial<T> sh[kThreads];
  Partial<T> p = identity<T>();
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    element<T, KIND>(nl[i], ol[i], adv[i], P, grad[i], p);
  block_reduce(sh, p);
  if (threadIdx.x == 0) parts[blockIdx.x] = sh[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const Partial<T>* __restrict__ parts, int64_t nparts, int64_t n, T* loss, T* fstats,
              int64_t* istats) {
  __shared__ Partial<T> sh[kThreads];
  Partial<T> p = identity<T>();
  for (int64_t b = threadIdx.x; b < nparts; b += kThreads) combine(p, parts[b]);
  block_reduce(sh, p);
  if (threadIdx.x == 0) finish(sh[0], n, loss, fstats, istats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> surrogate_fwd_cuda(
    const at::Tensor& new_logp, const at::Tensor& old_logp, const at::Tensor& adv, double clip_coef,
    int64_t kind) {
  TORCH_CHECK(new_logp.dim() == 1 && new_logp.sizes() == old_logp.sizes() && new_logp.sizes() == adv.sizes());
  TORCH_CHECK(new_logp.numel() > 0 && kind >= PPO && kind <= VPG);
  TORCH_CHECK(old_logp.scalar_type() == new_logp.scalar_type() && adv.scalar_type() == new_logp.scalar_type());
  TORCH_CHECK(old_logp.device() == new_logp.device() && adv.device() == new_logp.device());
  const c10::cuda::CUDAGuard guard(new_logp.device());
  const auto nl = new_logp.contiguous(), ol = old_logp.contiguous(), ad = adv.contiguous();
  const int64_t n = nl.numel();
  const int64_t blocks = std::min(kMaxBlocks, (n + kThreads - 1) / kThreads);
  auto loss = at::empty({}, nl.options());
  auto grad = at::empty({n}, nl.options());
  auto fstats = at::empty({5}, nl.options());
  auto istats = at::empty({2}, nl.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(nl.scalar_type(), "surrogate_fwd_cuda", [&] {
    const auto P = make_params<scalar_t>(clip_coef, n);  // host libm, same as the CPU path
    auto parts = at::empty({blocks * int64_t(sizeof(Partial<scalar_t>))}, nl.options().dtype(at::kByte));
    auto* pp = reinterpret_cast<Partial<scalar_t>*>(parts.mutable_data_ptr());
    dispatch_kind(kind, [&](auto k) {
      partials_kernel<scalar_t, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(
          nl.const_data_ptr<scalar_t>(), ol.const_data_ptr<scalar_t>(), ad.const_data_ptr<scalar_t>(),
          grad.mutable_data_ptr<scalar_t>(), n, P, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(pp, blocks, n, loss.mutable_data_ptr<scalar_t>(),
                                                        fstats.mutable_data_ptr<scalar_t>(),
                                                        istats.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, fstats, istats};
}

TORCH_LIBRARY_IMPL(stable_pg, CUDA, m) { m.impl("surrogate_fwd", &surrogate_fwd_cuda); }

}  // namespace stable_pg
