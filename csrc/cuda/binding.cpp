// CUDA implementations of the sami_kernels_C ops (schemas: csrc/cpu/*.cpp, loaded first as
// sami_kernels._C).  Host code only: the chunk loops of csrc/cpu/linear_logprobs.cpp, with
// cuBLAS GEMMs (at::mm_out / at::mm / addmm_) and the torch-free epilogue kernels of
// csrc/cuda/*.cu (launchers.h) on the current stream.
//
// Same algorithm and buffer budget as the CPU host code; differences:
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

#include <algorithm>
#include <cstdint>

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

int64_t pick_chunk_rows(int64_t chunk_rows, int64_t T, int64_t V) {
  if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(1, (int64_t(512) << 20) / (V * 4));
  return std::max<int64_t>(1, std::min(chunk_rows, T));
}

at::ScalarType acc_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Bias in the accumulation dtype (V values) for the epilogue, or undefined.
at::Tensor bias_acc(const c10::optional<at::Tensor>& bias, at::ScalarType acc) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->to(acc).contiguous();
}

// ----- linear log-probs -------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& targets, int64_t ignore_index, double scale, bool want_u, int64_t chunk_rows) {
  check_inputs(hidden, weight, bias_in, targets);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc_type = acc_dtype(hidden);
  const at::Tensor bias = bias_acc(bias_in, acc_type);
  const bool low = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  const int code = dtype_code(hidden.scalar_type());

  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type);
  at::Tensor logp = at::empty({T}, acc);
  at::Tensor lse = at::empty({T}, acc);
  at::Tensor u = want_u ? at::empty({T, H}, acc) : at::empty({0}, acc);
  if (T == 0) return {logp, lse, u};
  TORCH_CHECK(V > 0, "linear_logprobs_fwd: empty vocabulary");

  const int64_t C = pick_chunk_rows(chunk_rows, T, V);
  at::Tensor buf = at::empty({C, V}, hidden.options());
  const at::Tensor wt = weight.t();
  for (int64_t t0 = 0; t0 < T; t0 += C) {
    const int64_t rows = std::min(C, T - t0);
    at::Tensor bchunk = buf.narrow(0, 0, rows);
    at::mm_out(bchunk, hidden.narrow(0, t0, rows), wt);
    C10_CUDA_CHECK(sami_lp_fwd_epilogue(
        bchunk.data_ptr(), rows, V, V, bias.defined() ? bias.const_data_ptr() : nullptr, scale,
        targets.const_data_ptr<int64_t>() + t0, ignore_index, logp.narrow(0, t0, rows).data_ptr(),
        lse.narrow(0, t0, rows).data_ptr(), want_u, code, stream()));
    if (want_u) {
      at::Tensor urows = u.narrow(0, t0, rows);
      if (low)
        urows.copy_(at::mm(bchunk, weight));  // 16-bit GEMM, fp32 accumulation inside
      else
        at::mm_out(urows, bchunk, weight);
    }
  }
  return {logp, lse, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp, int64_t ignore_index,
    double scale, bool need_dh, bool need_dw, bool need_db, int64_t chunk_rows) {
  check_inputs(hidden, weight, bias_in, targets);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc_type = acc_dtype(hidden);
  check_same_cuda_device(lse, hidden, "lse");
  check_same_cuda_device(grad_logp, hidden, "grad_logp");
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.dim() == 1 && lse.size(0) == T && lse.is_contiguous(),
              "lse must be a contiguous [T] tensor in the accumulation dtype");
  TORCH_CHECK(grad_logp.scalar_type() == acc_type && grad_logp.dim() == 1 && grad_logp.size(0) == T &&
                  grad_logp.is_contiguous(),
              "grad_logp must be a contiguous [T] tensor in the accumulation dtype");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  TORCH_CHECK(!need_db || has_bias, "need_db without a bias");

  const at::Tensor bias = bias_acc(bias_in, acc_type);
  const bool low = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  const int code = dtype_code(hidden.scalar_type());
  const auto acc = hidden.options().dtype(acc_type);
  const auto copt = hidden.options();
  at::Tensor dh, dw, db;
  if (T == 0 || V == 0 || !(need_dh || need_dw || need_db)) {
    if (need_dh) dh = at::zeros({T, H}, copt);
    if (need_dw) dw = at::zeros({V, H}, copt);
    if (need_db) db = at::zeros({V}, copt);
  } else {
    // Tiles [Tr, Vc], budget chunk_rows * V elements, chosen as in linear_logprobs_bwd_cpu:
    // all T rows x Vc >= 1024 vocabulary columns when the budget allows (each dW block written
    // once by a GEMM with K = T), else row chunks of full rows.
    constexpr int64_t kMinTileCols = 1024;
    const int64_t C = pick_chunk_rows(chunk_rows, T, V);
    const int64_t budget = C * V;
    int64_t Tr = C, Vc = V;
    if (budget / T >= std::min(V, kMinTileCols)) {
      Tr = T;
      Vc = std::min(V, budget / T);
      if (Vc < V) Vc = std::max<int64_t>(64, Vc / 64 * 64);
    }
    const int64_t nT = (T + Tr - 1) / Tr, nV = (V + Vc - 1) / Vc;
    at::Tensor buf_flat = at::empty({Tr * Vc}, copt);

    const bool dh_f32_acc = need_dh && low && nV > 1;  // dh summed over vocabulary tiles in fp32
    if (need_dh) dh = dh_f32_acc ? at::zeros({T, H}, acc) : at::empty({T, H}, copt);
    const bool dw_direct = nT == 1;  // else dW summed over row chunks in the accumulation dtype
    if (need_dw) dw = dw_direct ? at::empty({V, H}, copt) : at::zeros({V, H}, acc);
    at::Tensor dw_tmp = (need_dw && !dw_direct && low) ? at::empty({V, H}, copt) : at::Tensor();
    if (need_db) db = at::zeros({V}, acc);

    const size_t acc_size = acc_type == at::kDouble ? sizeof(double) : sizeof(float);
    const char* bias_p = bias.defined() ? static_cast<const char*>(bias.const_data_ptr()) : nullptr;
    for (int64_t t0 = 0; t0 < T; t0 += Tr) {
      const int64_t rows = std::min(Tr, T - t0);
      const at::Tensor hchunk = hidden.narrow(0, t0, rows);
      for (int64_t v0 = 0; v0 < V; v0 += Vc) {
        const int64_t cols = std::min(Vc, V - v0);
        at::Tensor tile = buf_flat.narrow(0, 0, rows * cols).view({rows, cols});
        const at::Tensor wc = weight.narrow(0, v0, cols);
        at::mm_out(tile, hchunk, wc.t());
        C10_CUDA_CHECK(sami_lp_bwd_epilogue(
            tile.data_ptr(), rows, cols, cols, v0, bias_p ? bias_p + v0 * acc_size : nullptr, scale,
            targets.const_data_ptr<int64_t>() + t0, ignore_index, lse.narrow(0, t0, rows).const_data_ptr(),
            grad_logp.narrow(0, t0, rows).const_data_ptr(), code, stream()));
        if (need_dh) {
          at::Tensor dh_rows = dh.narrow(0, t0, rows);
          if (dh_f32_acc)
            dh_rows.add_(at::mm(tile, wc));  // 16-bit GEMM, tile sums added in fp32
          else if (v0 == 0)
            at::mm_out(dh_rows, tile, wc);
          else
            dh_rows.addmm_(tile, wc);  // float32 / float64
        }
        if (need_dw) {
          if (dw_direct) {
            at::Tensor dw_rows = dw.narrow(0, v0, cols);
            at::mm_out(dw_rows, tile.t(), hchunk);
          } else if (low) {
            at::mm_out(dw_tmp, tile.t(), hchunk);  // Vc == V here
            dw.add_(dw_tmp);
          } else {
            dw.addmm_(tile.t(), hchunk);
          }
        }
        if (need_db) db.narrow(0, v0, cols).add_(tile.sum(0, /*keepdim=*/false, acc_type));
      }
    }
  }
  const auto in_dtype = hidden.scalar_type();
  const auto out_empty = hidden.options();
  return {need_dh ? dh.to(in_dtype) : at::empty({0}, out_empty), need_dw ? dw.to(in_dtype) : at::empty({0}, out_empty),
          need_db ? db.to(in_dtype) : at::empty({0}, out_empty)};
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
