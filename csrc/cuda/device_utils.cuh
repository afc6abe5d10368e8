// Device helpers shared by the CUDA kernels: element conversion, 16-byte packs,
// warp / block reductions of OnlineLSE states.  Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "logprob_math.h"

// glibc's declaration (assert.h leaves it out under NDEBUG); CUDA implements it in device code.
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept __attribute__((__noreturn__));

// Device-side check that stays on under NDEBUG, like c10's CUDA_KERNEL_ASSERT_PRINTF (these
// torch-free files cannot include it): a failing thread prints "sami_kernels: <message>", then
// fails the kernel.  The host sees cudaErrorAssert at its next synchronisation and the CUDA
// context is unusable afterwards, as after any torch device-side assert.
#define SAMI_DEVICE_CHECK(cond, fmt, ...)                                            \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      printf("sami_kernels: " fmt "\n", __VA_ARGS__);                                \
      __assert_fail(#cond, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
    }                                                                                \
  } while (0)

namespace sami_cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ----- element conversion to / from the accumulation type ---------------------
template <typename X> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename X> __device__ __forceinline__ X from_acc(typename AccOf<X>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float acc_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }

// ----- 16-byte packs -------------------------------------------------------------
// A row of n elements starting at p is processed as [head scalars][vectors of kVec][tail
// scalars], where the head reaches the first 16-byte boundary, so any row length and
// any row start (e.g. odd leading dimensions) work.
template <typename X>
struct Pack {
  static constexpr int kVec = 16 / sizeof(X);
  union {
    uint4 raw;
    X v[kVec];
  };
};

struct RowSplit {
  int64_t head;  // scalar elements before the first aligned pack
  int64_t nvec;  // aligned packs
  int64_t tail;  // scalar elements after the last pack (start: head + nvec * kVec)
};

template <typename X>
__device__ __forceinline__ RowSplit split_row(const X* p, int64_t n) {
  constexpr int64_t kVec = Pack<X>::kVec;
  const uint64_t addr = reinterpret_cast<uint64_t>(p);
  int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(X));
  if (addr % sizeof(X) != 0) head = n;  // not element-aligned: all scalar (never from torch)
  head = head < n ? head : n;
  const int64_t nvec = (n - head) / kVec;
  return RowSplit{head, nvec, n - head - nvec * kVec};
}

// ----- OnlineLSE reductions --------------------------------------------------------
template <typename A>
__device__ __forceinline__ sami::OnlineLSE<A> warp_merge(sami::OnlineLSE<A> st) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const A m = __shfl_xor_sync(kFullMask, st.m, off);
    const A s = __shfl_xor_sync(kFullMask, st.s, off);
    st.merge(sami::OnlineLSE<A>(m, s));
  }
  return st;  // every lane holds the warp's state (same order on every lane: deterministic)
}

// Block-wide merge (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// sm, ss: shared arrays of >= 32 values (plain arrays: __shared__ objects cannot have
// constructors).  Contains __syncthreads: call from every thread of the block.
template <typename A>
__device__ __forceinline__ sami::OnlineLSE<A> block_merge(sami::OnlineLSE<A> st, A* sm, A* ss) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  st = warp_merge(st);
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? sami::OnlineLSE<A>(sm[lane], ss[lane]) : sami::OnlineLSE<A>();
    st = warp_merge(st);
    if (lane == 0) {
      sm[0] = st.m;
      ss[0] = st.s;
    }
  }
  __syncthreads();
  return sami::OnlineLSE<A>(sm[0], ss[0]);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

}  // namespace sami_cuda
