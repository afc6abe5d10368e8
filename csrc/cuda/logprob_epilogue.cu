// Log-prob epilogues over logits chunks that cuBLAS produced (binding.cpp runs the GEMMs).
// Math: logprob_math.h (OnlineLSE, logit_value, logprob_grad_value).
//
// One block per row (64..256 threads, chosen from the row length); each thread walks its
// part of the row in 16-byte packs (4 x fp32, 8 x bf16 / fp16, 2 x fp64) with scalar head /
// tail elements, so any row length and any row alignment work.  Accumulation in float
// (double for fp64 buffers).
//   forward : per thread, one OnlineLSE state; per pack the pack max and the sum of exp(z -
//             pack max) are merged into it (two extra exps per pack instead of a rescale per
//             element).  States merge with warp shuffles, then across warps through shared
//             memory (fixed order: deterministic).  Every thread reads the target logit before
//             the first barrier (one broadcast load); with want_u a second pass rewrites the row
//             in place.  Row finish and non-finite semantics: finish_row / grad_coef.
//   backward: lse known, purely elementwise in place: g * scale * (onehot - exp(z - lse)).
// Targets: lp_check_targets_kernel, a device-side check (a host check would synchronise), runs
// on the stream before the epilogues of each op call: a bad target stops the stream there.
#include "device_utils.cuh"
#include "launchers.h"

namespace sami_cuda {
namespace {

constexpr int kMaxThreads = 256;

template <typename X>
__device__ __forceinline__ Pack<X> load_pack(const X* p) {
  Pack<X> pk;
  pk.raw = *reinterpret_cast<const uint4*>(p);
  return pk;
}

template <typename X>
__device__ __forceinline__ void store_pack(X* p, const Pack<X>& pk) {
  *reinterpret_cast<uint4*>(p) = pk.raw;
}

// Column of the c-th scalar (head, then tail) element of a split row.
__device__ __forceinline__ int64_t scalar_col(const RowSplit& sp, int64_t kvec, int64_t c) {
  return c < sp.head ? c : sp.head + sp.nvec * kvec + (c - sp.head);
}

template <typename X, typename A>
__device__ __forceinline__ A bias_at(const A* bias, int64_t col) {
  return bias ? __ldg(bias + col) : A(0);
}

template <typename X>
__device__ void zero_row(X* row, int64_t cols) {
  constexpr int64_t kVec = Pack<X>::kVec;
  const RowSplit sp = split_row(row, cols);
  for (int64_t c = threadIdx.x; c < sp.head + sp.tail; c += blockDim.x)
    row[scalar_col(sp, kVec, c)] = from_acc<X>(0);
  Pack<X> zero;
  zero.raw = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t k = threadIdx.x; k < sp.nvec; k += blockDim.x) store_pack(row + sp.head + k * kVec, zero);
}

// In place over one row of cols columns: row[c] = coef * (onehot(yl)[c] - exp(z[c] - lse)),
// z = scale * (row[c] + bias[c]), coef = sami::grad_coef(...); yl outside [0, cols) hits no column.
template <typename X, typename A>
__device__ void grad_row(X* row, int64_t cols, const A* bias, A scale, int64_t yl, A lse, A coef) {
  constexpr int64_t kVec = Pack<X>::kVec;
  const RowSplit sp = split_row(row, cols);
  for (int64_t c = threadIdx.x; c < sp.head + sp.tail; c += blockDim.x) {
    const int64_t col = scalar_col(sp, kVec, c);
    const A z = sami::logit_value<A>(to_acc(row[col]), bias_at<X>(bias, col), scale);
    row[col] = from_acc<X>(sami::logprob_grad_value<A>(coef, z, lse, col == yl));
  }
  X* body = row + sp.head;
  for (int64_t k = threadIdx.x; k < sp.nvec; k += blockDim.x) {
    Pack<X> pk = load_pack(body + k * kVec);
    const int64_t col0 = sp.head + k * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const A z = sami::logit_value<A>(to_acc(pk.v[i]), bias_at<X>(bias, col0 + i), scale);
      pk.v[i] = from_acc<X>(sami::logprob_grad_value<A>(coef, z, lse, col0 + i == yl));
    }
    store_pack(body + k * kVec, pk);
  }
}

template <typename X>
__global__ void __launch_bounds__(kMaxThreads)
    lp_fwd_kernel(X* __restrict__ logits, int64_t cols, int64_t ld,
                  const typename AccOf<X>::type* __restrict__ bias, typename AccOf<X>::type scale,
                  const int64_t* __restrict__ targets, int64_t ignore_index,
                  typename AccOf<X>::type* __restrict__ logp, typename AccOf<X>::type* __restrict__ lse,
                  bool want_u) {
  using A = typename AccOf<X>::type;
  constexpr int64_t kVec = Pack<X>::kVec;
  __shared__ A sm[kWarp], ss[kWarp];
  const int64_t r = blockIdx.x;
  X* row = logits + r * ld;
  const int64_t y = targets[r];
  if (y == ignore_index) {
    if (threadIdx.x == 0) logp[r] = lse[r] = A(0);
    if (want_u) zero_row(row, cols);
    return;  // uniform over the block: no barrier is skipped by some threads only
  }
  // Target logit, read before the barrier inside block_merge (want_u rewrites the row).
  const A zt = sami::logit_value<A>(to_acc(row[y]), bias_at<X>(bias, y), scale);

  const RowSplit sp = split_row(row, cols);
  sami::OnlineLSE<A> st;
  for (int64_t c = threadIdx.x; c < sp.head + sp.tail; c += blockDim.x) {
    const int64_t col = scalar_col(sp, kVec, c);
    st.update(sami::logit_value<A>(to_acc(row[col]), bias_at<X>(bias, col), scale));
  }
  const X* body = row + sp.head;
  for (int64_t k = threadIdx.x; k < sp.nvec; k += blockDim.x) {
    const Pack<X> pk = load_pack(body + k * kVec);
    const int64_t col0 = sp.head + k * kVec;
    A mx = A(-INFINITY);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const A z = sami::logit_value<A>(to_acc(pk.v[i]), bias_at<X>(bias, col0 + i), scale);
      mx = z > mx ? z : mx;  // NaN never wins: it poisons the sum below instead
    }
    const A mu = mx == A(-INFINITY) ? A(0) : mx;  // all -inf pack: exp(-inf) = 0, not NaN
    A s = A(0);
#pragma unroll
    for (int i = 0; i < kVec; ++i)  // z recomputed (registers, cached bias): no local array
      s += acc_exp(sami::logit_value<A>(to_acc(pk.v[i]), bias_at<X>(bias, col0 + i), scale) - mu);
    st.merge(sami::OnlineLSE<A>(mx, s));
  }
  const sami::RowLogp<A> res = sami::finish_row(zt, block_merge(st, sm, ss).finalize());
  if (threadIdx.x == 0) {
    logp[r] = res.logp;
    lse[r] = res.lse;
  }
  if (want_u) grad_row(row, cols, bias, scale, y, res.lse, sami::grad_coef(A(1), scale, res.lse));
}

template <typename X>
__global__ void __launch_bounds__(kMaxThreads)
    lp_bwd_kernel(X* __restrict__ tile, int64_t cols, int64_t ld, int64_t v0,
                  const typename AccOf<X>::type* __restrict__ bias, typename AccOf<X>::type scale,
                  const int64_t* __restrict__ targets, int64_t ignore_index,
                  const typename AccOf<X>::type* __restrict__ lse,
                  const typename AccOf<X>::type* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  X* row = tile + r * ld;
  const int64_t y = targets[r];
  if (y == ignore_index) {
    zero_row(row, cols);
    return;
  }
  grad_row(row, cols, bias, scale, y - v0, lse[r], sami::grad_coef(grad[r], scale, lse[r]));
}

// Every target is ignore_index or in [0, vocab); a bad one prints its index and value, then
// fails the kernel (SAMI_DEVICE_CHECK).
__global__ void lp_check_targets_kernel(const int64_t* __restrict__ targets, int64_t n, int64_t vocab,
                                        int64_t ignore_index) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t y = targets[t];
    SAMI_DEVICE_CHECK(y == ignore_index || (y >= 0 && y < vocab),
                      "targets[%lld] = %lld is outside [0, V=%lld) and is not ignore_index=%lld",
                      static_cast<long long>(t), static_cast<long long>(y), static_cast<long long>(vocab),
                      static_cast<long long>(ignore_index));
  }
}

int threads_for(int64_t cols, int vec) {
  const int64_t packs = (cols + vec - 1) / vec;
  int t = 64;
  while (t < kMaxThreads && t < packs) t *= 2;
  return t;
}

template <typename X>
cudaError_t launch_fwd(void* logits, int64_t rows, int64_t cols, int64_t ld, const void* bias,
                       double scale, const int64_t* targets, int64_t ignore_index, void* logp,
                       void* lse, bool want_u, cudaStream_t stream) {
  using A = typename AccOf<X>::type;
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  lp_fwd_kernel<X><<<static_cast<unsigned>(rows), threads_for(cols, Pack<X>::kVec), 0, stream>>>(
      static_cast<X*>(logits), cols, ld, static_cast<const A*>(bias), static_cast<A>(scale), targets,
      ignore_index, static_cast<A*>(logp), static_cast<A*>(lse), want_u);
  return cudaGetLastError();
}

template <typename X>
cudaError_t launch_bwd(void* tile, int64_t rows, int64_t cols, int64_t ld, int64_t v0,
                       const void* bias, double scale, const int64_t* targets, int64_t ignore_index,
                       const void* lse, const void* grad, cudaStream_t stream) {
  using A = typename AccOf<X>::type;
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  lp_bwd_kernel<X><<<static_cast<unsigned>(rows), threads_for(cols, Pack<X>::kVec), 0, stream>>>(
      static_cast<X*>(tile), cols, ld, v0, static_cast<const A*>(bias), static_cast<A>(scale), targets,
      ignore_index, static_cast<const A*>(lse), static_cast<const A*>(grad));
  return cudaGetLastError();
}

}  // namespace
}  // namespace sami_cuda

extern "C" cudaError_t sami_lp_fwd_epilogue(void* logits, int64_t rows, int64_t cols, int64_t ld,
                                            const void* bias, double scale, const int64_t* targets,
                                            int64_t ignore_index, void* logp, void* lse, bool want_u,
                                            int dtype, cudaStream_t stream) {
  using namespace sami_cuda;
  switch (dtype) {
    case kF32: return launch_fwd<float>(logits, rows, cols, ld, bias, scale, targets, ignore_index, logp, lse, want_u, stream);
    case kBF16: return launch_fwd<__nv_bfloat16>(logits, rows, cols, ld, bias, scale, targets, ignore_index, logp, lse, want_u, stream);
    case kF16: return launch_fwd<__half>(logits, rows, cols, ld, bias, scale, targets, ignore_index, logp, lse, want_u, stream);
    case kF64: return launch_fwd<double>(logits, rows, cols, ld, bias, scale, targets, ignore_index, logp, lse, want_u, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t sami_lp_check_targets(const int64_t* targets, int64_t n, int64_t vocab,
                                             int64_t ignore_index, cudaStream_t stream) {
  using namespace sami_cuda;
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + kMaxThreads - 1) / kMaxThreads;
  lp_check_targets_kernel<<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), kMaxThreads, 0, stream>>>(
      targets, n, vocab, ignore_index);
  return cudaGetLastError();
}

extern "C" cudaError_t sami_lp_bwd_epilogue(void* tile, int64_t rows, int64_t cols, int64_t ld, int64_t v0,
                                            const void* bias, double scale, const int64_t* targets,
                                            int64_t ignore_index, const void* lse, const void* grad,
                                            int dtype, cudaStream_t stream) {
  using namespace sami_cuda;
  switch (dtype) {
    case kF32: return launch_bwd<float>(tile, rows, cols, ld, v0, bias, scale, targets, ignore_index, lse, grad, stream);
    case kBF16: return launch_bwd<__nv_bfloat16>(tile, rows, cols, ld, v0, bias, scale, targets, ignore_index, lse, grad, stream);
    case kF16: return launch_bwd<__half>(tile, rows, cols, ld, v0, bias, scale, targets, ignore_index, lse, grad, stream);
    case kF64: return launch_bwd<double>(tile, rows, cols, ld, v0, bias, scale, targets, ignore_index, lse, grad, stream);
    default: return cudaErrorInvalidValue;
  }
}
