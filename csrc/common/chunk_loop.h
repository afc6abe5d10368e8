// Host chunk loops of the fused linear log-prob ops, shared by the CPU
// (csrc/cpu/linear_logprobs.cpp) and CUDA (csrc/cuda/binding.cpp) implementations: GEMMs through
// ATen (oneDNN / cuBLAS), the per-row epilogue through a device policy.  Torch-aware host code;
// never included by .cu files.
//
// Math (per-element formulas: logprob_math.h).  hidden h [T, H], weight W [V, H], optional bias
// b [V], one dtype (float32 / bfloat16 / float16 / float64); targets y [T] int64:
//   z        = scale * (h @ W^T + b)                      [T, V], materialised whole only if kept
//   forward : lse = logsumexp_v z,  logp = z[y] - lse     [T] each (ignored rows: 0, 0)
//             want_u: u = scale * (onehot(y) - softmax(z)) @ W   [T, H]
//   backward: dz = g * scale * (onehot(y) - exp(z - lse))  (0 for ignored rows), g = grad_logp
//             dh = dz @ W [T, H],  dW = dz^T @ h [V, H],  db = sum_t dz [V]
// Non-finite inputs: logprob_math.h (finish_row, grad_coef).  Rows with a zero gradient by rule
// (ignored, dead) have zero dz rows, but 0 * inf or NaN inside a GEMM is NaN: their hidden rows
// are zeroed before the backward GEMMs and their u / dh rows after (zero_grad_rows).
// logp, lse, u, g are in the accumulation dtype (float64 for float64 inputs, else float32);
// dh, dW, db come back in the input dtype.
//
// Tiles.  Logits live in one reused buffer of chunk_rows * V elements in the compute dtype: a
// GEMM writes a [Tr, Vc] tile, the epilogue rewrites it in place (to dz in the backward and for
// u's left factor), and GEMMs with W / h consume it.  When the budget
// holds >= kMinTileCols columns of all T rows the tiles are vocabulary chunks of all rows
// (Tr = T): GEMMs are taller than row chunks of few whole rows, every dW block is written once
// by a GEMM with K = T, and the forward merges online-logsumexp states across tiles (policies
// with kTiledForward; whole rows are needed for u).  Otherwise row chunks (Vc = V).
// keep_logits (trainable weight): the forward computes the whole [T, V] x = h @ W^T as one
// tile and returns it; the backward given it back turns it into dz in place (one tile, no
// recompute: 6THV FLOPs instead of 8THV, no memory beyond the T * V kept elements).  It consumes
// the kept logits: a second backward must recompute.
// With a 16-bit compute dtype the GEMMs round their outputs to 16 bits: u is that product cast
// to float32, and sums over several tiles (dh over vocabulary tiles, dW over row chunks) are
// accumulated in float32.
//
// Epilogue policy P (one per device):
//   static constexpr bool kUpcastHalf;     // float16 inputs run the float32 path, outputs cast back
//   static constexpr bool kTiledForward;   // fwd takes vocabulary tiles of rows, not only whole rows
//   static int64_t default_chunk_rows(int64_t V, int64_t elsize);  // for chunk_rows <= 0
//   static void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate);
//       // out (+)= a @ b (2-D; a, b contiguous or transposed views of contiguous tensors)
//   static void check_targets(const at::Tensor& targets, int64_t ignore_index, int64_t V);
//       // fails unless every target is ignore_index or in [0, V): the epilogues index rows with them
//   static void fwd(const LogitTile& t, void* logp, void* lse, void* s, bool want_u);
//   static void bwd(const LogitTile& t, const void* lse, const void* grad);
// fwd / bwd act as sami_lp_fwd_epilogue / sami_lp_bwd_epilogue (csrc/cuda/launchers.h) on the
// tile's rows; logp, lse, s, grad point at the tile's first row, in the accumulation dtype.
// fwd on a vocabulary tile (kTiledForward): a row's tiles come in order; before its last one,
// lse and s hold the row's online-logsumexp state (m, s) and logp its target logit, z[y].
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace sami {

// One [rows, cols] tile of GEMM output x = h . W[v] (row stride cols) for the epilogue.
struct LogitTile {
  void* data;              // compute dtype, rewritten in place
  int64_t rows, cols;
  int64_t v0;              // first vocabulary column of the tile
  int64_t vocab;           // V
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

// [T, 1] mask of the rows whose gradient is exactly 0 whatever their values: ignored rows and
// dead rows (stored lse = +inf, logprob_math.h).
inline at::Tensor zero_grad_rows(const at::Tensor& targets, const at::Tensor& lse,
                                 int64_t ignore_index) {
  return targets.eq(ignore_index).logical_or_(lse.eq(INFINITY)).unsqueeze(1);
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

// Tile shape [Tr, Vc] for a budget of chunk_rows * V elements (see "Tiles" above).
template <typename P>
std::pair<int64_t, int64_t> tile_shape(int64_t chunk_rows, int64_t T, int64_t V, int64_t elsize) {
  constexpr int64_t kMinTileCols = 1024;
  const int64_t C = pick_chunk_rows<P>(chunk_rows, T, V, elsize);
  const int64_t budget = C * V;
  if (budget / T < std::min(V, kMinTileCols)) return {C, V};
  const int64_t Vc = std::min(V, budget / T);
  return {T, Vc < V ? std::max<int64_t>(64, Vc / 64 * 64) : V};
}

// Forward: per tile, x = h[rows] @ W[cols]^T, epilogue; with want_u (whole rows) then
// u[rows] = tile @ W.  Returns (logp, lse, u, logits) in the accumulation dtype but logits
// (compute dtype); u is empty without want_u, logits empty without keep_logits.
template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& targets, int64_t ignore_index,
    double scale, bool want_u, int64_t chunk_rows, bool keep_logits) {
  TORCH_CHECK(!(want_u && keep_logits), "linear_logprobs_fwd: want_u needs no kept logits");
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
  at::Tensor logits = at::empty({keep_logits ? T : 0, V}, hidden.options());
  if (T == 0) return {logp, lse, u, logits};
  TORCH_CHECK(V > 0, "linear_logprobs_fwd: empty vocabulary");
  P::check_targets(targets, ignore_index, V);

  int64_t Tr = T, Vc = V;  // keep_logits: one tile, the kept logits
  if (!keep_logits) {
    if (!want_u && P::kTiledForward)
      std::tie(Tr, Vc) = tile_shape<P>(chunk_rows, T, V, hidden.element_size());
    else
      Tr = pick_chunk_rows<P>(chunk_rows, T, V, hidden.element_size());
  }
  const at::Tensor buf = keep_logits ? logits.view({-1}) : at::empty({Tr * Vc}, hidden.options());
  const at::Tensor s = Vc < V ? at::empty({T}, acc) : at::Tensor();  // online-logsumexp sums
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  for (int64_t t0 = 0; t0 < T; t0 += Tr) {
    const int64_t rows = std::min(Tr, T - t0);
    const at::Tensor hchunk = hidden.narrow(0, t0, rows);
    for (int64_t v0 = 0; v0 < V; v0 += Vc) {
      const int64_t cols = std::min(Vc, V - v0);
      at::Tensor tile = buf.narrow(0, 0, rows * cols).view({rows, cols});
      P::gemm(tile, hchunk, weight.narrow(0, v0, cols).t(), false);
      const LogitTile lt{tile.data_ptr(), rows, cols, v0, V,
                         bias.defined() ? const_element(bias, v0) : nullptr, scale, tg + t0,
                         ignore_index, dtype};
      P::fwd(lt, element(logp, t0), element(lse, t0), s.defined() ? element(s, t0) : nullptr,
             want_u);
      if (want_u) {
        at::Tensor urows = u.narrow(0, t0, rows);
        if (low)
          urows.copy_(at::mm(tile, weight));  // 16-bit GEMM, fp32 accumulation inside
        else
          P::gemm(urows, tile, weight, false);
      }
    }
  }
  if (want_u) u.masked_fill_(zero_grad_rows(targets, lse, ignore_index), 0);
  return {logp, lse, u, logits};
}

// Backward: tiles [Tr, Vc] of recomputed logits (budget chunk_rows * V elements), or the one
// [T, V] tile of kept logits (overwritten); per tile the epilogue (tile = dz), then
// dh (+)= tile @ W_c, dW_c (+)= tile^T @ h, db_c += sum_rows(tile).
// Returns (dh, dW, db) in the input dtype; the ones not asked for are empty.
template <typename P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& grad_logp, int64_t ignore_index, double scale, bool need_dh, bool need_dw,
    bool need_db, int64_t chunk_rows, const c10::optional<at::Tensor>& logits) {
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
  const at::Tensor zero_rows = zero_grad_rows(targets, lse, ignore_index);
  const at::Tensor hidden = (upcast ? hidden_in.to(at::kFloat) : hidden_in).masked_fill(zero_rows, 0);
  const at::Tensor weight = upcast ? weight_in.to(at::kFloat) : weight_in;
  const at::Tensor bias = bias_acc(bias_in, acc_type);
  const auto dtype = hidden.scalar_type();
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  const auto acc = hidden.options().dtype(acc_type);
  const auto copt = hidden.options();
  const bool kept = logits.has_value() && logits->defined();
  if (kept)
    TORCH_CHECK(logits->scalar_type() == dtype && logits->dim() == 2 && logits->size(0) == T &&
                    logits->size(1) == V && logits->is_contiguous() &&
                    logits->device() == hidden.device(),
                "logits must be the forward's kept [T, V] logits in the compute dtype ", dtype);

  at::Tensor dh, dw, db;
  if (T == 0 || V == 0 || !(need_dh || need_dw || need_db)) {
    if (need_dh) dh = at::zeros({T, H}, copt);
    if (need_dw) dw = at::zeros({V, H}, copt);
    if (need_db) db = at::zeros({V}, copt);
  } else {
    P::check_targets(targets, ignore_index, V);
    const auto [Tr, Vc] = kept ? std::pair<int64_t, int64_t>{T, V}
                               : tile_shape<P>(chunk_rows, T, V, hidden.element_size());
    const int64_t nT = (T + Tr - 1) / Tr, nV = (V + Vc - 1) / Vc;
    at::Tensor buf_flat = kept ? logits->view({-1}) : at::empty({Tr * Vc}, copt);

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
        if (!kept) P::gemm(tile, hchunk, wc.t(), false);
        const LogitTile lt{tile.data_ptr(), rows, cols, v0, V,
                           bias.defined() ? const_element(bias, v0) : nullptr, scale, tg + t0,
                           ignore_index, dtype};
        P::bwd(lt, const_element(lse, t0), const_element(grad_logp, t0));
        if (need_dh) {
          at::Tensor dh_rows = dh.narrow(0, t0, rows);
          if (dh_f32_acc)
            dh_rows.add_(at::mm(tile, wc));  // 16-bit GEMM, tile sums added in fp32
          else
            P::gemm(dh_rows, tile, wc, v0 > 0);  // float32 / float64, or one 16-bit tile
        }
        if (need_dw) {
          if (dw_direct) {
            at::Tensor dw_rows = dw.narrow(0, v0, cols);
            P::gemm(dw_rows, tile.t(), hchunk, false);
          } else if (low) {
            // Vc == V here: 16-bit GEMM (fp32 accumulation inside), chunk added in fp32
            at::mm_out(dw_tmp, tile.t(), hchunk);
            dw.add_(dw_tmp);
          } else {
            P::gemm(dw, tile.t(), hchunk, true);
          }
        }
        if (need_db) db.narrow(0, v0, cols).add_(tile.sum(0, /*keepdim=*/false, acc_type));
      }
    }
    if (need_dh) dh.masked_fill_(zero_rows, 0);
  }

  const auto out_empty = hidden_in.options();
  return {need_dh ? dh.to(in_dtype) : at::empty({0}, out_empty),
          need_dw ? dw.to(in_dtype) : at::empty({0}, out_empty),
          need_db ? db.to(in_dtype) : at::empty({0}, out_empty)};
}

}  // namespace sami
