// CUDA implementations of the sami_kernels_C ops (schemas: csrc/cpu/*.cpp, loaded first as
// sami_kernels._C).  Host code only: the torch-free kernels of csrc/cuda/*.cu (launchers.h) on
// the current stream; for the linear log-probs, the chunk loops of csrc/common/chunk_loop.h
// (shared with the CPU build: same algorithm and buffer budget) with cuBLAS GEMMs and the
// epilogue kernels as CudaEpilogue.  Differences from the CPU build:
//   * float16 runs natively (cuBLAS half GEMMs, fp32 accumulation inside) instead of being
//     upcast to float32: fp16 is treated like bf16 (low-precision buffer, fp32 accumulators
//     for dh over vocabulary tiles and dW over row chunks).
//   * default chunk budget 512 MiB of float32 logits (the Python side always passes one).
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "chunk_loop.h"
#include "launchers.h"

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sami_cuda::kF32;
    case at::kBFloat16: return sami_cuda::kBF16;
    case at::kHalf: return sami_cuda::kF16;
    case at::kDouble: return sami_cuda::kF64;
    default: break;
  }
  TORCH_CHECK(false, "sami_kernels CUDA: unsupported dtype ", t);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_same_cuda_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but expected ", like.device());
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& targets) {
  TORCH_CHECK(hidden.is_cuda(), "expected CUDA tensors");
  check_same_cuda_device(weight, hidden, "weight");
  check_same_cuda_device(targets, hidden, "targets");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden and weight must be 2-D");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden/weight hidden-size mismatch");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "hidden/weight must be contiguous");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "hidden must be float32, bfloat16, float16 or float64");
  TORCH_CHECK(weight.scalar_type() == dt, "hidden and weight must share a dtype");
  if (bias.has_value() && bias->defined()) {
    check_same_cuda_device(*bias, hidden, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V]");
    TORCH_CHECK(bias->scalar_type() == dt, "bias must share the hidden dtype");
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [T]");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK(targets.is_contiguous(), "targets must be contiguous");
}

// ----- linear log-probs -------------------------------------------------------------
// Epilogue policy of the shared chunk loops (chunk_loop.h): the kernels of logprob_epilogue.cu.
struct CudaEpilogue {
  static constexpr bool kUpcastHalf = false;
  static constexpr bool kTiledForward = false;  // whole rows per block; chunks of 512 MiB are tall
  static int64_t default_chunk_rows(int64_t V, int64_t /*elsize*/) {
    return (int64_t(512) << 20) / (V * 4);  // 512 MiB of float32 logits
  }
  static void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {  // cuBLAS
    if (accumulate)
      out.addmm_(a, b);
    else
      at::mm_out(out, a, b);
  }
  static void check_targets(const at::Tensor& targets, int64_t ignore_index, int64_t V) {
    C10_CUDA_CHECK(sami_lp_check_targets(targets.const_data_ptr<int64_t>(), targets.size(0), V, ignore_index,
                                         stream()));
  }
  static void fwd(const sami::LogitTile& t, void* logp, void* lse, void* /*s*/, bool want_u) {
    TORCH_INTERNAL_ASSERT(t.v0 == 0 && t.cols == t.vocab, "the CUDA forward epilogue takes whole rows");
    C10_CUDA_CHECK(sami_lp_fwd_epilogue(t.data, t.rows, t.cols, t.cols, t.bias, t.scale, t.targets,
                                        t.ignore_index, logp, lse, want_u, dtype_code(t.dtype),
                                        stream()));
  }
  static void bwd(const sami::LogitTile& t, const void* lse, const void* grad) {
    C10_CUDA_CHECK(sami_lp_bwd_epilogue(t.data, t.rows, t.cols, t.cols, t.v0, t.bias, t.scale,
                                        t.targets, t.ignore_index, lse, grad, dtype_code(t.dtype),
                                        stream()));
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double scale, bool want_u, int64_t chunk_rows,
    bool keep_logits) {
  check_inputs(hidden, weight, bias, targets);
  const c10::cuda::CUDAGuard guard(hidden.device());
  return sami::linear_logprobs_fwd<CudaEpilogue>(hidden, weight, bias, targets, ignore_index, scale, want_u,
                                                 chunk_rows, keep_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp, int64_t ignore_index,
    double scale, bool need_dh, bool need_dw, bool need_db, int64_t chunk_rows,
    const c10::optional<at::Tensor>& logits) {
  check_inputs(hidden, weight, bias, targets);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_same_cuda_device(lse, hidden, "lse");
  check_same_cuda_device(grad_logp, hidden, "grad_logp");
  return sami::linear_logprobs_bwd<CudaEpilogue>(hidden, weight, bias, targets, lse, grad_logp, ignore_index,
                                                 scale, need_dh, need_dw, need_db, chunk_rows, logits);
}

// ----- InfoNCE --------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> infonce_fwd_cuda(const at::Tensor& M, int64_t direction) {
  TORCH_CHECK(M.is_cuda(), "infonce_fwd: expected a CUDA tensor");
  TORCH_CHECK(M.dim() == 3 && M.size(1) == M.size(2), "infonce_fwd: M must be [B, N, N]");
  TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
              "infonce_fwd: M must be float32 or float64");
  TORCH_CHECK(M.is_contiguous(), "infonce_fwd: M must be contiguous");
  TORCH_CHECK(direction >= 0 && direction <= 2, "infonce_fwd: direction must be 0, 1 or 2");
  const c10::cuda::CUDAGuard guard(M.device());
  const int64_t B = M.size(0), N = M.size(1);
  at::Tensor loss = at::empty({B}, M.options());
  at::Tensor dM = at::empty_like(M);
  if (B == 0) return {loss, dM};
  TORCH_CHECK(N > 0, "infonce_fwd: N must be positive");
  TORCH_CHECK(2 * N * static_cast<int64_t>(M.element_size()) <= 48 * 1024, "infonce_fwd: N = ", N, " is too large");
  C10_CUDA_CHECK(sami_infonce(M.const_data_ptr(), B, N, static_cast<int>(direction), loss.data_ptr(), dM.data_ptr(),
                              dtype_code(M.scalar_type()), stream()));
  return {loss, dM};
}

// ----- segment sum --------------------------------------------------------------------
// Offsets are not validated on the device (that would synchronise): the kernels clamp them to
// [0, T] and treat a decreasing pair as an empty segment.
void check_segment_args(const at::Tensor& x, const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  check_same_cuda_device(offsets, x, "offsets");
  TORCH_CHECK(x.dim() == 1, op, ": expected a 1-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": expected float32 or float64");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              op, ": offsets must be an int64 [S + 1] tensor");
}

at::Tensor segment_sum_cuda(const at::Tensor& values, const at::Tensor& offsets_in) {
  check_segment_args(values, offsets_in, "segment_sum");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), offsets = offsets_in.contiguous();
  const int64_t S = offsets.size(0) - 1;
  at::Tensor sums = at::empty({S}, v.options());
  C10_CUDA_CHECK(sami_segment_sum(v.const_data_ptr(), v.size(0), offsets.const_data_ptr<int64_t>(), S,
                                  sums.data_ptr(), dtype_code(v.scalar_type()), stream()));
  return sums;
}

at::Tensor segment_sum_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& offsets_in, int64_t num_values) {
  check_segment_args(grad_sums, offsets_in, "segment_sum_backward");
  TORCH_CHECK(grad_sums.size(0) == offsets_in.size(0) - 1, "segment_sum_backward: grad_sums must be [S]");
  const c10::cuda::CUDAGuard guard(grad_sums.device());
  const at::Tensor g = grad_sums.contiguous(), offsets = offsets_in.contiguous();
  at::Tensor out = at::zeros({num_values}, g.options());
  C10_CUDA_CHECK(sami_segment_sum_bwd(g.const_data_ptr(), offsets.const_data_ptr<int64_t>(), g.size(0), num_values,
                                      out.data_ptr(), dtype_code(g.scalar_type()), stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sami_kernels_C, CUDA, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd_cuda);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd_cuda);
  m.impl("infonce_fwd", &infonce_fwd_cuda);
  m.impl("segment_sum", &segment_sum_cuda);
  m.impl("segment_sum_backward", &segment_sum_backward_cuda);
}

// `import sami_kernels._C_cuda` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
