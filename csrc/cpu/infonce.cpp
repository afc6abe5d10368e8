// InfoNCE loss + gradient over a batch of small score matrices (CPU).
// Math: sami::infonce_matrix in logprob_math.h (double internally; N is tiny).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "logprob_math.h"

namespace {

std::tuple<at::Tensor, at::Tensor> infonce_fwd_cpu(const at::Tensor& M, int64_t direction) {
  TORCH_CHECK(M.dim() == 3 && M.size(1) == M.size(2), "infonce_fwd: M must be [B, N, N]");
  TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
              "infonce_fwd: M must be float32 or float64");
  TORCH_CHECK(M.is_contiguous(), "infonce_fwd: M must be contiguous");
  TORCH_CHECK(direction >= 0 && direction <= 2, "infonce_fwd: direction must be 0, 1 or 2");
  const int64_t B = M.size(0), N = M.size(1);
  at::Tensor loss = at::empty({B}, M.options());
  at::Tensor dM = at::empty_like(M);
  if (B == 0) return {loss, dM};
  TORCH_CHECK(N > 0, "infonce_fwd: N must be positive");
  const int dir = static_cast<int>(direction);
  const int64_t grain = std::max<int64_t>(1, 4096 / (N * N));
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "infonce_fwd", [&] {
    const scalar_t* m = M.const_data_ptr<scalar_t>();
    scalar_t* d = dM.mutable_data_ptr<scalar_t>();
    scalar_t* l = loss.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        l[b] = static_cast<scalar_t>(
            sami::infonce_matrix<double>(m + b * N * N, N, N, 1, dir, d + b * N * N, N, 1));
      }
    });
  });
  return {loss, dM};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sami_kernels_C, m) {
  m.def("infonce_fwd(Tensor M, int direction) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sami_kernels_C, CPU, m) {
  m.impl("infonce_fwd", &infonce_fwd_cpu);
}
