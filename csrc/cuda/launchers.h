// Host-callable launchers of the CUDA kernels in csrc/cuda/*.cu.  Torch-free: raw
// pointers, sizes, a dtype code and a stream; each returns the launch's cudaError_t.
// binding.cpp (the only torch-aware file) calls these between cuBLAS GEMMs.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sami_cuda {

// Element type of the logits buffer / values.  Accumulation: float for kF32 / kBF16 /
// kF16, double for kF64; every "acc" pointer below has the accumulation type.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

}  // namespace sami_cuda

extern "C" {

// Forward epilogue over a [rows, cols] logits chunk (row stride ld elements) that a GEMM
// wrote (x = h . W[v]), cols = V.  Per row r with target y = targets[r]:
//   z = scale * (x + bias[v]);  lse[r] = logsumexp(z);  logp[r] = z[y] - lse[r]
// (non-finite rows: sami::finish_row).  ignore_index rows: logp = lse = 0.  want_u: the chunk
// is then overwritten in place with scale * (onehot(y) - exp(z - lse)) (zeros for ignored and
// dead rows).  bias: acc dtype or null.  Targets: in [0, cols) (sami_lp_check_targets).
cudaError_t sami_lp_fwd_epilogue(void* logits, int64_t rows, int64_t cols, int64_t ld,
                                 const void* bias, double scale, const int64_t* targets,
                                 int64_t ignore_index, void* logp, void* lse, bool want_u,
                                 int dtype, cudaStream_t stream);

// Backward epilogue over a [rows, cols] tile of recomputed logits holding vocabulary
// columns [v0, v0 + cols) (bias already offset to v0), in place:
//   tile[r, c] = coef[r] * (onehot(y - v0)[c] - exp(z - lse[r]))   (0 for ignored rows),
// coef = sami::grad_coef(g[r], scale, lse[r]).
cudaError_t sami_lp_bwd_epilogue(void* tile, int64_t rows, int64_t cols, int64_t ld, int64_t v0,
                                 const void* bias, double scale, const int64_t* targets,
                                 int64_t ignore_index, const void* lse, const void* grad,
                                 int dtype, cudaStream_t stream);

// Device-side check that each of the n targets is ignore_index or in [0, vocab): a bad one
// prints "sami_kernels: targets[i] = y is outside [0, V=vocab) ..." and fails the kernel with
// a device assert (cudaErrorAssert at the next synchronisation).
cudaError_t sami_lp_check_targets(const int64_t* targets, int64_t n, int64_t vocab,
                                  int64_t ignore_index, cudaStream_t stream);

// sums[s] = sum of values[offsets[s] .. offsets[s+1]) (values sorted by segment), float64
// accumulation in a fixed order (deterministic); dtype kF32 or kF64.  Offsets are clamped
// to [0, num_values].
cudaError_t sami_segment_sum(const void* values, int64_t num_values, const int64_t* offsets,
                             int64_t num_segments, void* sums, int dtype, cudaStream_t stream);

// Backward (a gather): grad_values[t] = grad_sums[s] for t in segment s.  Values outside
// every segment are left untouched (the caller zero-fills).
cudaError_t sami_segment_sum_bwd(const void* grad_sums, const int64_t* offsets,
                                 int64_t num_segments, int64_t num_values, void* grad_values,
                                 int dtype, cudaStream_t stream);

// InfoNCE over B contiguous [N, N] matrices: loss [B] and dM [B, N, N] (see
// logprob_math.h for the math); direction 0 = both, 1 = row, 2 = col; dtype kF32 / kF64.
cudaError_t sami_infonce(const void* M, int64_t B, int64_t N, int direction, void* loss,
                         void* dM, int dtype, cudaStream_t stream);

}  // extern "C"
