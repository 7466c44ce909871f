// CUDA kernel of stable_pg::surrogate_fwd (schema in surrogate.cpp, per-element math, checks and
// output allocation in surrogate.h).
//
// Deterministic two-pass reduction, no atomics: pass 1 runs a grid-stride loop whose grid size
// depends only on N, so every thread always sees the same elements; each block tree-reduces its
// threads in shared memory and writes one partial. Pass 2, a single block, reduces the partials
// in a fixed order and writes the outputs. Sums are accumulated in double.
//
// The op is bound by memory traffic: 4 words per element here (3 loads, the gradient store), 2 in the
// backward's multiply. Each thread therefore takes kVec consecutive elements per trip, 16 bytes of
// each input, read with one 128-bit load when the pointers allow it: four (float32) or two (float64)
// times more bytes in flight per thread than with scalar loads. A misaligned input takes the same
// elements in the same order with scalar loads: the result does not depend on the alignment.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "surrogate.h"

namespace stable_pg {

constexpr int kThreads = 256;  // power of two: the tree reduction below halves it
template <typename T>
constexpr int kVec = 16 / sizeof(T);  // consecutive elements per thread and trip: 16 bytes
// Enough blocks for several waves on any current GPU, so the last, partly filled wave costs
// little; the grid still depends on N alone, so results do not depend on the device.
constexpr int64_t kMaxBlocks = 4096;

// kVec elements that move as one 128-bit load or store.
template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

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
                T* __restrict__ grad, int64_t n, bool aligned, Params<T> P, Partial<T>* __restrict__ parts) {
  __shared__ Partial<T> sh[kThreads];
  constexpr int V = kVec<T>;
  // a thread sees at most N / (kMaxBlocks * kThreads) + V elements: 32-bit counts suffice
  Partial<T, int32_t> p = identity<T, int32_t>();
  const int64_t stride = int64_t(gridDim.x) * kThreads * V;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V; i < n; i += stride) {
    if (aligned && i + V <= n) {
      // all loads first: they are independent, and the element math needs them together
      const Pack<T> a = *reinterpret_cast<const Pack<T>*>(nl + i);
      const Pack<T> b = *reinterpret_cast<const Pack<T>*>(ol + i);
      const Pack<T> c = *reinterpret_cast<const Pack<T>*>(adv + i);
      Pack<T> g;
#pragma unroll
      for (int j = 0; j < V; ++j) element<T, KIND>(a.v[j], b.v[j], c.v[j], P, g.v[j], p);
      *reinterpret_cast<Pack<T>*>(grad + i) = g;
    } else {  // a misaligned input, or the last, partial pack
      for (int64_t j = i; j < i + V && j < n; ++j) element<T, KIND>(nl[j], ol[j], adv[j], P, grad[j], p);
    }
  }
  block_reduce(sh, Partial<T>{p.surr, p.kl, p.max_lr, p.min_lr, p.max_eff, p.n_clip, p.n_nonfinite, p.n_overflow});
  if (threadIdx.x == 0) parts[blockIdx.x] = sh[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const Partial<T>* __restrict__ parts, int64_t nparts, int64_t n, T* loss, T* fstats,
              int64_t* istats) {
  __shared__ Partial<T> sh[kThreads];
  Partial<T> p = identity<T>();
  // unrolled so that several partials are loaded at once; they are still combined in index order
#pragma unroll 4
  for (int64_t b = threadIdx.x; b < nparts; b += kThreads) combine(p, parts[b]);
  block_reduce(sh, p);
  if (threadIdx.x == 0) finish(sh[0], n, loss, fstats, istats);
}

template <typename T>
bool is_aligned(const T* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % alignof(Pack<T>) == 0;
}

Outputs surrogate_fwd_cuda(
    const at::Tensor& new_logp, const at::Tensor& old_logp, const at::Tensor& adv, double clip_coef,
    int64_t kind) {
  const c10::cuda::CUDAGuard guard(new_logp.device());
  const Call c = prepare(new_logp, old_logp, adv, kind);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(c.nl.scalar_type(), "surrogate_fwd_cuda", [&] {
    constexpr int64_t per_block = kThreads * kVec<scalar_t>;
    const int64_t blocks = std::min(kMaxBlocks, (c.n + per_block - 1) / per_block);
    const auto P = make_params<scalar_t>(clip_coef, c.n);  // host libm, same as the CPU path
    const scalar_t* nl = c.nl.const_data_ptr<scalar_t>();
    const scalar_t* ol = c.ol.const_data_ptr<scalar_t>();
    const scalar_t* ad = c.adv.const_data_ptr<scalar_t>();
    scalar_t* grad = c.grad.mutable_data_ptr<scalar_t>();
    const bool aligned = is_aligned(nl) && is_aligned(ol) && is_aligned(ad) && is_aligned<scalar_t>(grad);
    auto parts = at::empty({blocks * int64_t(sizeof(Partial<scalar_t>))}, c.nl.options().dtype(at::kByte));
    auto* pp = reinterpret_cast<Partial<scalar_t>*>(parts.mutable_data_ptr());
    dispatch_kind(kind, [&](auto k) {
      partials_kernel<scalar_t, decltype(k)::value><<<blocks, kThreads, 0, stream>>>(nl, ol, ad, grad, c.n, aligned, P, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(pp, blocks, c.n, c.loss.mutable_data_ptr<scalar_t>(),
                                                        c.fstats.mutable_data_ptr<scalar_t>(),
                                                        c.istats.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.outputs();
}

TORCH_LIBRARY_IMPL(stable_pg, CUDA, m) { m.impl("surrogate_fwd", &surrogate_fwd_cuda); }

}  // namespace stable_pg
