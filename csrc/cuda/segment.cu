// Per-sequence segment sum over values sorted by sequence, and its backward (a gather).
// One warp per segment, 8 segments per 256-thread block.  Forward: lane l adds values
// begin + l, begin + l + 32, ... in float64, then a fixed xor-butterfly combines the 32
// lanes: the order depends only on the segment's length, never on scheduling, and there
// are no atomics, so results are bitwise reproducible (not bitwise equal to the CPU's
// left-to-right sum, which has another order; both accumulate in float64).
#include "device_utils.cuh"
#include "launchers.h"

namespace sami_cuda {
namespace {

constexpr int kSegThreads = 256;
constexpr int kSegsPerBlock = kSegThreads / kWarp;

__device__ __forceinline__ void segment_bounds(const int64_t* offsets, int64_t s, int64_t n,
                                               int64_t* begin, int64_t* end) {
  int64_t b = offsets[s], e = offsets[s + 1];
  b = b < 0 ? 0 : (b > n ? n : b);
  e = e < b ? b : (e > n ? n : e);
  *begin = b;
  *end = e;
}

template <typename X>
__global__ void __launch_bounds__(kSegThreads)
    segment_sum_kernel(const X* __restrict__ values, int64_t n, const int64_t* __restrict__ offsets,
                       int64_t num_segments, X* __restrict__ sums) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kSegsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= num_segments) return;  // whole warps only: the shuffles below stay full-mask
  int64_t begin, end;
  segment_bounds(offsets, s, n, &begin, &end);
  double acc = 0.0;
  for (int64_t t = begin + lane; t < end; t += kWarp) acc += static_cast<double>(values[t]);
  acc = warp_sum(acc);
  if (lane == 0) sums[s] = static_cast<X>(acc);
}

template <typename X>
__global__ void __launch_bounds__(kSegThreads)
    segment_sum_bwd_kernel(const X* __restrict__ grad_sums, const int64_t* __restrict__ offsets,
                           int64_t num_segments, int64_t n, X* __restrict__ grad_values) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kSegsPerBlock + threadIdx.x / kWarp;
  if (s >= num_segments) return;
  int64_t begin, end;
  segment_bounds(offsets, s, n, &begin, &end);
  const X g = grad_sums[s];
  for (int64_t t = begin + threadIdx.x % kWarp; t < end; t += kWarp) grad_values[t] = g;
}

unsigned seg_blocks(int64_t num_segments) {
  return static_cast<unsigned>((num_segments + kSegsPerBlock - 1) / kSegsPerBlock);
}

}  // namespace
}  // namespace sami_cuda

extern "C" cudaError_t sami_segment_sum(const void* values, int64_t num_values, const int64_t* offsets,
                                        int64_t num_segments, void* sums, int dtype, cudaStream_t stream) {
  using namespace sami_cuda;
  if (num_segments <= 0) return cudaSuccess;
  const unsigned blocks = seg_blocks(num_segments);
  if (dtype == kF32)
    segment_sum_kernel<float><<<blocks, kSegThreads, 0, stream>>>(
        static_cast<const float*>(values), num_values, offsets, num_segments, static_cast<float*>(sums));
  else if (dtype == kF64)
    segment_sum_kernel<double><<<blocks, kSegThreads, 0, stream>>>(
        static_cast<const double*>(values), num_values, offsets, num_segments, static_cast<double*>(sums));
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

extern "C" cudaError_t sami_segment_sum_bwd(const void* grad_sums, const int64_t* offsets, int64_t num_segments,
                                            int64_t num_values, void* grad_values, int dtype,
                                            cudaStream_t stream) {
  using namespace sami_cuda;
  if (num_segments <= 0) return cudaSuccess;
  const unsigned blocks = seg_blocks(num_segments);
  if (dtype == kF32)
    segment_sum_bwd_kernel<float><<<blocks, kSegThreads, 0, stream>>>(
        static_cast<const float*>(grad_sums), offsets, num_segments, num_values, static_cast<float*>(grad_values));
  else if (dtype == kF64)
    segment_sum_bwd_kernel<double><<<blocks, kSegThreads, 0, stream>>>(
        static_cast<const double*>(grad_sums), offsets, num_segments, num_values,
        static_cast<double*>(grad_values));
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}
