// Host chunk loops of the fused linear log-prob ops, shared by the CPU
// (csrc/cpu/linear_logprobs.cpp) and CUDA (csrc/cuda/binding.cpp) implementations: GEMMs through
// ATen (oneDNN / cuBLAS), the per-row epilogue through a device policy.  Torch-aware host code;
// never included by .cu files.
//
// Math (per-element formulas: logprob_math.h).  hidden h [T, H], weight W [V, H], optional bias
// b [V], one dtype (float32 / bfloat16 / float16 / float64); targets y [T] int64:
//   z        = scale * (h @ W^T + b)                      [T, V], never materialised whole
//   forward : lse = logsumexp_v z,  logp = z[y] - lse     [T] each (ignored rows: 0, 0)
//             want_u: u = scale * (onehot(y) - softmax(z)) @ W   [T, H]
//   backward: dz = g * scale * (onehot(y) - exp(z - lse))  (0 for ignored rows), g = grad_logp
//             dh = dz @ W [T, H],  dW = dz^T @ h [V, H],  db = sum_t dz [V]
// logp, lse, u, g are in the accumulation dtype (float64 for float64 inputs, else float32);
// dh, dW, db come back in the input dtype.  Logits live in one reused buffer of chunk_rows * V
// elements in the compute dtype: a GEMM writes a tile, the epilogue rewrites it in place (to dz
// in the backward and for u), and GEMMs with W / h consume it.  With a 16-bit compute dtype the
// GEMMs round their outputs to 16 bits: u is that product cast to float32, and sums over
// several tiles (dh over vocabulary tiles, dW over row chunks) are accumulated in float32.
//
// Epilogue policy P (one per device):
//   static constexpr bool kUpcastHalf;   // float16 inputs run the float32 path, outputs cast back
//   static int64_t default_chunk_rows(int64_t V, int64_t elsize);  // for chunk_rows <= 0
//   static void fwd(const LogitTile& t, void* logp, void* lse, bool want_u);
//   static void bwd(const LogitTile& t, const void* lse, const void* grad);
// fwd / bwd act as sami_lp_fwd_epilogue / sami_lp_bwd_epilogue (csrc/cuda/launchers.h) on the
// tile's rows; logp, lse, grad point at the tile's first row, in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace sami {

// One [rows, cols] tile of GEMM output x = h . W[v] (row stride cols) for the epilogue.
struct LogitTile {
  void* data;              // compute dtype, rewritten in place
  int64_t rows, cols;
  int64_t v0;              // first vocabulary column of the tile (0 in the forward)
  const void* bias;        // bias[v0 : v0 + cols] in the accumulation dtype, or nullptr
  double scale;
  const int64_t* targets;  // the tile rows' targets (global vocabulary index)
  int64_t ignore_index;
  at::ScalarType dtype;    // compute dtype of data
};

inline at::ScalarType acc_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Copy of the bias (V values) in the accumulation dtype for the epilogue, or undefined.
inline at::Tensor bias_acc(const c10::optional<at::Tensor>& bias, at::ScalarType acc) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  return bias->to(acc).contiguous();
}

// Address of element i of a contiguous tensor.
inline void* element(const at::Tensor& t, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + i * t.element_size();
}
inline const void* const_element(const at::Tensor& t, int64_t i) {
  return static_cast<const char*>(t.const_data_ptr()) + i * t.element_size();
}

template <typename P>
int64_t pick_chunk_rows(int64_t chunk_rows, int64_t T, int64_t V, int64_t elsize) {
  if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(1, P::default_chunk_rows(V, elsize));
  return std::max<int64_t>(1, std::min(chunk_rows, T));
}

// Forward: chunks of C token rows; buf[:rows] = h[t0 : t0 + rows] @ W^T, epilogue, then
// u = buf @ W.  Returns (logp, lse, u) in the accumulation dtype; u is empty without want_u.
template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& targets, int64_t ignore_index,
    double scale, bool want_u, int64_t chunk_rows) {
  const bool upcast = P::kUpcastHalf && hidden_in.scalar_type() == at::kHalf;
  const at::Tensor hidden = upcast ? hidden_in.to(at::kFloat) : hidden_in;
  const at::Tensor weight = upcast ? weight_in.to(at::kFloat) : weight_in;
  const auto acc_type = acc_dtype(hidden);
  const at::Tensor bias = bias_acc(bias_in, acc_type);
  const auto dtype = hidden.scalar_type();
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;

  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type);
  at::Tensor logp = at::empty({T}, acc);
  at::Tensor lse = at::empty({T}, acc);
  at::Tensor u = want_u ? at::empty({T, H}, acc) : at::empty({0}, acc);
  if (T == 0) return {logp, lse, u};
  TORCH_CHECK(V > 0, "linear_logprobs_fwd: empty vocabulary");

  const int64_t C = pick_chunk_rows<P>(chunk_rows, T, V, hidden.element_size());
  at::Tensor buf = at::empty({C, V}, hidden.options());
  const at::Tensor wt = weight.t();
  const void* bias_p = bias.defined() ? bias.const_data_ptr() : nullptr;
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  for (int64_t t0 = 0; t0 < T; t0 += C) {
    const int64_t rows = std::min(C, T - t0);
    at::Tensor bchunk = buf.narrow(0, 0, rows);
    at::mm_out(bchunk, hidden.narrow(0, t0, rows), wt);
    const LogitTile tile{bchunk.data_ptr(), rows, V, /*v0=*/0, bias_p, scale, tg + t0,
                         ignore_index, dtype};
    P::fwd(tile, element(logp, t0), element(lse, t0), want_u);
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

// Backward: tiles [Tr, Vc] of recomputed logits, buffer budget chunk_rows * V elements; per
// tile GEMM, epilogue (tile = dz), then dh (+)= tile @ W_c, dW_c (+)= tile^T @ h,
// db_c += sum_rows(tile).
// Returns (dh, dW, db) in the input dtype; the ones not asked for are empty.
template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& grad_logp, int64_t ignore_index, double scale, bool need_dh, bool need_dw,
    bool need_db, int64_t chunk_rows) {
  const int64_t T = hidden_in.size(0), H = hidden_in.size(1), V = weight_in.size(0);
  const auto acc_type = acc_dtype(hidden_in);
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.dim() == 1 && lse.size(0) == T &&
                  lse.is_contiguous(),
              "lse must be a contiguous [T] tensor in the accumulation dtype");
  TORCH_CHECK(grad_logp.scalar_type() == acc_type && grad_logp.dim() == 1 &&
                  grad_logp.size(0) == T && grad_logp.is_contiguous(),
              "grad_logp must be a contiguous [T] tensor in the accumulation dtype");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  TORCH_CHECK(!need_db || has_bias, "need_db without a bias");

  const auto in_dtype = hidden_in.scalar_type();
  const bool upcast = P::kUpcastHalf && in_dtype == at::kHalf;
  const at::Tensor hidden = upcast ? hidden_in.to(at::kFloat) : hidden_in;
  const at::Tensor weight = upcast ? weight_in.to(at::kFloat) : weight_in;
  const at::Tensor bias = bias_acc(bias_in, acc_type);
  const auto dtype = hidden.scalar_type();
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  const auto acc = hidden.options().dtype(acc_type);
  const auto copt = hidden.options();

  at::Tensor dh, dw, db;
  if (T == 0 || V == 0 || !(need_dh || need_dw || need_db)) {
    if (need_dh) dh = at::zeros({T, H}, copt);
    if (need_dw) dw = at::zeros({V, H}, copt);
    if (need_db) db = at::zeros({V}, copt);
  } else {
    // lse is known, so tiles need not span whole rows: when the budget holds >= kMinTileCols
    // columns of all T rows, use one row block (Tr = T) and chunk the vocabulary.  Then every dW
    // block is written once by a GEMM with K = T (no re-accumulation of the [V, H] gradient per
    // chunk, 16-bit dW rounded once), and dh ([T, H], small) accumulates over vocabulary chunks.
    // Otherwise row chunks of chunk_rows full rows.
    constexpr int64_t kMinTileCols = 1024;
    const int64_t C = pick_chunk_rows<P>(chunk_rows, T, V, hidden.element_size());
    const int64_t budget = C * V;
    int64_t Tr = C, Vc = V;
    if (budget / T >= std::min(V, kMinTileCols)) {
      Tr = T;
      Vc = std::min(V, budget / T);
      if (Vc < V) Vc = std::max<int64_t>(64, Vc / 64 * 64);
    }
    const int64_t nT = (T + Tr - 1) / Tr, nV = (V + Vc - 1) / Vc;
    at::Tensor buf_flat = at::empty({Tr * Vc}, copt);

    // dh: accumulated over vocabulary tiles (in float32 when the GEMM output is 16-bit)
    const bool dh_f32_acc = need_dh && low && nV > 1;
    if (need_dh) dh = dh_f32_acc ? at::zeros({T, H}, acc) : at::empty({T, H}, copt);
    // dW: one row block -> each [Vc, H] block written once; else an accumulation-dtype sum
    const bool dw_direct = nT == 1;
    if (need_dw) dw = dw_direct ? at::empty({V, H}, copt) : at::zeros({V, H}, acc);
    at::Tensor dw_tmp = (need_dw && !dw_direct && low) ? at::empty({V, H}, copt) : at::Tensor();
    if (need_db) db = at::zeros({V}, acc);

    const int64_t* tg = targets.const_data_ptr<int64_t>();
    for (int64_t t0 = 0; t0 < T; t0 += Tr) {
      const int64_t rows = std::min(Tr, T - t0);
      const at::Tensor hchunk = hidden.narrow(0, t0, rows);
      for (int64_t v0 = 0; v0 < V; v0 += Vc) {
        const int64_t cols = std::min(Vc, V - v0);
        at::Tensor tile = buf_flat.narrow(0, 0, rows * cols).view({rows, cols});
        const at::Tensor wc = weight.narrow(0, v0, cols);
        at::mm_out(tile, hchunk, wc.t());
        const void* bias_c = bias.defined() ? const_element(bias, v0) : nullptr;
        const LogitTile lt{tile.data_ptr(), rows, cols, v0, bias_c, scale, tg + t0, ignore_index,
                           dtype};
        P::bwd(lt, const_element(lse, t0), const_element(grad_logp, t0));
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
            // Vc == V here: 16-bit GEMM (fp32 accumulation inside), chunk added in fp32
            at::mm_out(dw_tmp, tile.t(), hchunk);
            dw.add_(dw_tmp);
          } else {
            dw.addmm_(tile.t(), hchunk);
          }
        }
        if (need_db) db.narrow(0, v0, cols).add_(tile.sum(0, /*keepdim=*/false, acc_type));
      }
    }
  }

  const auto out_empty = hidden_in.options();
  return {need_dh ? dh.to(in_dtype) : at::empty({0}, out_empty),
          need_dw ? dw.to(in_dtype) : at::empty({0}, out_empty),
          need_db ? db.to(in_dtype) : at::empty({0}, out_empty)};
}

}  // namespace sami
