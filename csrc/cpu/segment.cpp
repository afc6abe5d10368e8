// Per-sequence segment sum (CPU) and its backward, for values already sorted by sequence:
//   segment_sum(values [T], offsets [S+1]) -> sums [S],  sums[s] = sum values[offsets[s]:offsets[s+1]]
//   segment_sum_backward(grad_sums [S], offsets [S+1], T) -> grad_values [T]  (a gather; 0 outside
//   every segment)
// values float32 / float64; each segment is summed left to right in float64 (deterministic),
// the result cast to the values' dtype.  The CUDA implementations live in csrc/cuda/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

void check_offsets_cpu(const at::Tensor& offsets, int64_t num_values) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, "segment_sum: offsets must be [S + 1]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "segment_sum: offsets must be int64");
  TORCH_CHECK(offsets.is_contiguous(), "segment_sum: offsets must be contiguous");
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t S = offsets.size(0) - 1;
  TORCH_CHECK(off[0] >= 0 && off[S] <= num_values, "segment_sum: offsets must lie in [0, ", num_values,
              "], got ", off[0], " .. ", off[S]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(off[s] <= off[s + 1], "segment_sum: offsets must not decrease (offsets[", s, "] = ", off[s],
                " > offsets[", s + 1, "] = ", off[s + 1], ")");
}

at::Tensor segment_sum_cpu(const at::Tensor& values, const at::Tensor& offsets) {
  TORCH_CHECK(values.device().is_cpu() && offsets.device().is_cpu(), "segment_sum: expected CPU tensors");
  TORCH_CHECK(values.dim() == 1, "segment_sum: values must be 1-D");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "segment_sum: values must be float32 or float64");
  TORCH_CHECK(values.is_contiguous(), "segment_sum: values must be contiguous");
  check_offsets_cpu(offsets, values.size(0));
  const int64_t S = offsets.size(0) - 1;
  at::Tensor sums = at::empty({S}, values.options());
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "segment_sum", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    scalar_t* out = sums.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, S, 256, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        double acc = 0.0;
        for (int64_t t = off[s]; t < off[s + 1]; ++t) acc += static_cast<double>(v[t]);
        out[s] = static_cast<scalar_t>(acc);
      }
    });
  });
  return sums;
}

at::Tensor segment_sum_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& offsets, int64_t num_values) {
  TORCH_CHECK(grad_sums.device().is_cpu() && offsets.device().is_cpu(), "segment_sum_backward: expected CPU tensors");
  TORCH_CHECK(grad_sums.scalar_type() == at::kFloat || grad_sums.scalar_type() == at::kDouble,
              "segment_sum_backward: grad_sums must be float32 or float64");
  TORCH_CHECK(grad_sums.dim() == 1 && grad_sums.size(0) == offsets.size(0) - 1,
              "segment_sum_backward: grad_sums must be [S] for offsets [S + 1]");
  check_offsets_cpu(offsets, num_values);
  const at::Tensor g = grad_sums.contiguous();
  at::Tensor out = at::zeros({num_values}, g.options());
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "segment_sum_backward", [&] {
    const scalar_t* gs = g.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.size(0), 256, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s)
        for (int64_t t = off[s]; t < off[s + 1]; ++t) o[t] = gs[s];
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sami_kernels_C, m) {
  m.def("segment_sum(Tensor values, Tensor offsets) -> Tensor");
  m.def("segment_sum_backward(Tensor grad_sums, Tensor offsets, int num_values) -> Tensor");
}

TORCH_LIBRARY_IMPL(sami_kernels_C, CPU, m) {
  m.impl("segment_sum", &segment_sum_cpu);
  m.impl("segment_sum_backward", &segment_sum_backward_cpu);
}
