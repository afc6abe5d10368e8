// Batched InfoNCE [B, N, N]: loss [B] and dM [B, N, N] in one kernel, one block per query.
// Math: logprob_math.h (the serial sami::infonce_matrix, here spread over threads).
//   phase 1: each warp takes lines (rows i, then columns j) in turn; lanes stride over the
//            line with one OnlineLSE state each, merged by warp shuffles -> row / column
//            logsumexps in shared memory (2N values).
//   phase 2: each thread writes whole dM elements (row and column terms together: no
//            read-modify-write); warp 0 sums the loss terms in a fixed order.
// Accumulation in float (double for float64 M).
#include "device_utils.cuh"
#include "launchers.h"

namespace sami_cuda {
namespace {

constexpr int kNceThreads = 128;

template <typename A>
__global__ void __launch_bounds__(kNceThreads)
    infonce_kernel(const A* __restrict__ M_all, int64_t N, int direction, A* __restrict__ loss,
                   A* __restrict__ dM_all) {
  extern __shared__ unsigned char smem_raw[];
  A* lse_row = reinterpret_cast<A*>(smem_raw);  // [N]
  A* lse_col = lse_row + N;                     // [N]
  const A* M = M_all + static_cast<int64_t>(blockIdx.x) * N * N;
  A* dM = dM_all + static_cast<int64_t>(blockIdx.x) * N * N;
  const bool use_row = direction == 0 || direction == 1;
  const bool use_col = direction == 0 || direction == 2;
  const A w = (use_row && use_col) ? A(0.5) : A(1);
  const A wn = w / static_cast<A>(N);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;

  for (int64_t line = warp; line < 2 * N; line += nwarps) {
    const bool is_row = line < N;
    if ((is_row && !use_row) || (!is_row && !use_col)) continue;  // uniform over the warp
    const int64_t k = is_row ? line : line - N;
    const int64_t step = is_row ? 1 : N;  // along row k: M[k, j]; along column k: M[i, k]
    const A* p = is_row ? M + k * N : M + k;
    sami::OnlineLSE<A> st;
    for (int64_t q = lane; q < N; q += kWarp) st.update(p[q * step]);
    st = warp_merge(st);
    if (lane == 0) (is_row ? lse_row : lse_col)[k] = st.finalize();
  }
  __syncthreads();

  for (int64_t e = threadIdx.x; e < N * N; e += blockDim.x) {
    const int64_t i = e / N, j = e % N;
    const A m = M[e];
    A d = A(0);
    if (use_row) d += acc_exp(m - lse_row[i]) - (i == j ? A(1) : A(0));
    if (use_col) d += acc_exp(m - lse_col[j]) - (i == j ? A(1) : A(0));
    dM[e] = wn * d;
  }
  if (warp == 0) {
    A part = A(0);
    for (int64_t i = lane; i < N; i += kWarp) {
      const A diag = M[i * N + i];
      if (use_row) part += lse_row[i] - diag;
      if (use_col) part += lse_col[i] - diag;
    }
    part = warp_sum(part);
    if (lane == 0) loss[blockIdx.x] = wn * part;
  }
}

template <typename A>
cudaError_t launch(const void* M, int64_t B, int64_t N, int direction, void* loss, void* dM,
                   cudaStream_t stream) {
  const size_t smem = 2 * static_cast<size_t>(N) * sizeof(A);
  if (smem > 48 * 1024 || B > 0x7fffffff) return cudaErrorInvalidValue;
  infonce_kernel<A><<<static_cast<unsigned>(B), kNceThreads, smem, stream>>>(
      static_cast<const A*>(M), N, direction, static_cast<A*>(loss), static_cast<A*>(dM));
  return cudaGetLastError();
}

}  // namespace
}  // namespace sami_cuda

extern "C" cudaError_t sami_infonce(const void* M, int64_t B, int64_t N, int direction, void* loss, void* dM,
                                    int dtype, cudaStream_t stream) {
  using namespace sami_cuda;
  if (B <= 0 || N <= 0) return cudaSuccess;
  if (direction < 0 || direction > 2) return cudaErrorInvalidValue;
  if (dtype == kF32) return launch<float>(M, B, N, direction, loss, dM, stream);
  if (dtype == kF64) return launch<double>(M, B, N, direction, loss, dM, stream);
  return cudaErrorInvalidValue;
}
