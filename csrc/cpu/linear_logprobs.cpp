// Fused linear log-prob kernels (CPU): logits are never materialised as T x V, unless kept from
// the forward for the backward (keep_logits, chunk_loop.h).
//
// The host chunk loops (GEMMs, tiling, dh / dW / db accumulation) are sami::linear_logprobs_fwd /
// _bwd of chunk_loop.h, shared with the CUDA build; this file supplies their CPU epilogue
// (CpuEpilogue): per-row fused passes parallelised over rows (at::parallel_for).
// Forward: one pass per row of a tile, blockwise online logsumexp (merged across vocabulary
// tiles) + target gather; with want_u a second pass over the (L2-hot) row writes
// scale*(onehot - p).
// Backward: lse is known, so tiles may be [T, Vc] vocabulary chunks; one in-place pass writes
// g*scale*(onehot - exp(z - lse)).
// Math: logprob_math.h.  The row loops use a branch-free exp polynomial so GCC vectorises them;
// they are compiled for AVX-512 / AVX2 / baseline and picked at load time (target_clones).
//
// GEMMs: float32 through oneDNN when ATen has it (cpu_gemm below), else, and for the other dtypes,
// ATen's (MKL / oneDNN for bfloat16).
//
// Dtypes (hidden / weight / bias share one):
//   float32 : everything in float32.
//   bfloat16: GEMMs in bf16 (oneDNN, fp32 accumulation inside, bf16 output); the
//             buffer is bf16, the epilogue upcasts each value as it reads it and
//             rounds (RNE) when it writes dz back.  u = bf16 GEMM output cast to
//             f32; dW: each chunk's bf16 product is added into a float32
//             accumulator (a reused [V, H] bf16 temp), cast to bf16 at the end.
//   float64 : everything in float64 (std::exp), for gradcheck and exactness tests.
//   float16 : CPU half GEMMs are slow (no native fp16 FMA on most CPUs: ~5x slower
//             than fp32 here), so inputs are upcast to float32 once per call and
//             the float32 path runs; outputs are cast back.  Costs one fp32 copy
//             of W (V*H*4 bytes) per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>

#include "chunk_loop.h"
#include "logprob_math.h"

// The kernels below never read the floating-point exception flags: let GCC assume no FP traps,
// so that the selects of fast_exp vectorise on AVX2 too (checked with objdump: ymm code in the
// arch_x86_64_v3 clones).  NaN / inf semantics are unchanged (unlike -ffast-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#if (defined(__GNUC__) && !defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define SAMI_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAMI_CPU_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SAMI_AI inline __attribute__((always_inline))
#else
#define SAMI_AI inline
#endif

namespace {

constexpr int64_t kLanes = 16;   // independent accumulators (one AVX-512 vector)
constexpr int64_t kBlock = 512;  // floats per epilogue block (2 KiB, stays in L1)

// ----- element conversion ---------------------------------------------------
SAMI_AI float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
SAMI_AI uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
SAMI_AI float to_f(float x) { return x; }
SAMI_AI double to_f(double x) { return x; }
SAMI_AI float to_f(at::BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.x) << 16); }
SAMI_AI void from_f(float v, float* dst) { *dst = v; }
SAMI_AI void from_f(double v, double* dst) { *dst = v; }
SAMI_AI void from_f(float v, at::BFloat16* dst) {
  // round to nearest even; NaN stays (quiet) NaN
  const uint32_t u = float_to_bits(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  dst->x = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
}

// ----- branch-free exp (Cephes-style, ~1-2 ulp), vectorisable ------------------
// x < -87.3 (incl. -inf) -> 0; NaN -> NaN; x is at most ~0 in all callers.
SAMI_AI float fast_exp(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float xc = x < lo ? lo : x;  // NaN passes through both clamps
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: float add rounds to an integer
  const float tm = xc * 1.44269504088896341f + magic;
  const float n = tm - magic;                                          // round(x / ln 2)
  const int32_t ni = static_cast<int32_t>(float_to_bits(tm) - float_to_bits(magic));
  float r = xc - n * 0.693359375f;  // exact: few bits in the constant
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float two_n = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float res = p * two_n;
  return x < lo ? 0.0f : res;
}

// Accumulation type: float for float32 / bfloat16 storage, double for float64.
template <typename X> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
SAMI_AI float acc_exp(float x) { return fast_exp(x); }
SAMI_AI double acc_exp(double x) { return std::exp(x); }

// ----- row kernels ------------------------------------------------------------
// z block: z[i] = scale * (x[i] + b[i])
template <typename X, typename A = typename AccOf<X>::type>
SAMI_AI void load_z(const X* __restrict src, const A* __restrict bias, A scale, int64_t n,
                    A* __restrict z) {
  if (bias) {
    for (int64_t i = 0; i < n; ++i) z[i] = scale * (to_f(src[i]) + bias[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) z[i] = scale * to_f(src[i]);
  }
}

// Online-logsumexp state of n values of one row of z, single pass over memory: per block of
// kBlock values, the block max and sum exp(z - block max) are computed on an L1-resident copy,
// then merged into the running state (OnlineLSE::merge).
template <typename X, typename A = typename AccOf<X>::type>
SAMI_AI sami::OnlineLSE<A> row_lse(const X* __restrict row, const A* __restrict bias, A scale,
                                   int64_t n) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  alignas(64) A z[kBlock];
  sami::OnlineLSE<A> st;
  for (int64_t v0 = 0; v0 < n; v0 += kBlock) {
    const int64_t m = std::min(kBlock, n - v0);
    load_z(row + v0, bias ? bias + v0 : nullptr, scale, m, z);
    A mx[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) mx[l] = kNegInf;
    int64_t i = 0;
    for (; i + kLanes <= m; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) mx[l] = z[i + l] > mx[l] ? z[i + l] : mx[l];
    A bm = kNegInf;
    for (; i < m; ++i) bm = z[i] > bm ? z[i] : bm;
    for (int64_t l = 0; l < kLanes; ++l) bm = mx[l] > bm ? mx[l] : bm;
    // all -inf block: subtract 0 so -inf stays -inf (exp -> 0) instead of NaN
    const A mu = bm == kNegInf ? A(0) : bm;
    A acc[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) acc[l] = A(0);
    i = 0;
    for (; i + kLanes <= m; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += acc_exp(z[i + l] - mu);
    A bs = A(0);
    for (; i < m; ++i) bs += acc_exp(z[i] - mu);
    for (int64_t l = 0; l < kLanes; ++l) bs += acc[l];
    st.merge(sami::OnlineLSE<A>(bm, bs));
  }
  return st;
}

// In place over n columns: row[v] = coef * (onehot(target)[v] - exp(z[v] - lse)),
// coef = sami::grad_coef(...); target < 0: the target column is not among these n columns.
template <typename X, typename A = typename AccOf<X>::type>
SAMI_AI void row_grad(X* __restrict row, const A* __restrict bias, A scale, int64_t n,
                      int64_t target, A lse, A coef) {
  const A zt = target >= 0 ? sami::logit_value<A>(to_f(row[target]), bias ? bias[target] : A(0), scale)
                           : A(0);
  const A ncoef = -coef;
  if (bias) {
    for (int64_t v = 0; v < n; ++v)
      from_f(ncoef * acc_exp(scale * (to_f(row[v]) + bias[v]) - lse), row + v);
  } else {
    for (int64_t v = 0; v < n; ++v) from_f(ncoef * acc_exp(scale * to_f(row[v]) - lse), row + v);
  }
  if (target >= 0) from_f(sami::logprob_grad_value<A>(coef, zt, lse, true), row + target);
}

template <typename X>
SAMI_AI void zero_row(X* row, int64_t n) {
  std::memset(static_cast<void*>(row), 0, sizeof(X) * n);
}

template <typename A>
struct RowArgs {
  void* buf;            // [rows, cols] tile (compute dtype), rewritten in place
  int64_t cols;         // columns in this tile
  int64_t v0, vocab;    // the tile's first column, V
  const A* bias;        // bias for these columns in the accumulation type, or nullptr
  A scale;
  const int64_t* targets;  // the tile rows' targets (global vocabulary index)
  int64_t ignore_index;
};

// Forward epilogue for rows [r0, r1) of a tile (chunk_loop.h: whole rows, or vocabulary tiles
// in order with the online-logsumexp state in (lse, s) and z[y] in logp before the last).
template <typename X, typename A = typename AccOf<X>::type>
SAMI_AI void fwd_rows_impl(const RowArgs<A>& a, int64_t r0, int64_t r1, bool want_u, A* logp,
                           A* lse, A* s) {
  const bool first = a.v0 == 0, last = a.v0 + a.cols == a.vocab;
  for (int64_t r = r0; r < r1; ++r) {
    X* row = static_cast<X*>(a.buf) + r * a.cols;
    const int64_t y = a.targets[r];
    if (y == a.ignore_index) {
      if (last) logp[r] = lse[r] = A(0);
      if (want_u) zero_row(row, a.cols);
      continue;
    }
    sami::OnlineLSE<A> st = first ? sami::OnlineLSE<A>() : sami::OnlineLSE<A>(lse[r], s[r]);
    st.merge(row_lse(row, a.bias, a.scale, a.cols));
    const int64_t yl = y - a.v0;
    if (yl >= 0 && yl < a.cols)
      logp[r] = sami::logit_value<A>(to_f(row[yl]), a.bias ? a.bias[yl] : A(0), a.scale);
    if (!last) {
      lse[r] = st.m;
      s[r] = st.s;
      continue;
    }
    const sami::RowLogp<A> res = sami::finish_row(logp[r], st.finalize());
    logp[r] = res.logp;
    lse[r] = res.lse;
    if (want_u)  // whole rows; the row is still in L2
      row_grad(row, a.bias, a.scale, a.cols, y, res.lse, sami::grad_coef(A(1), a.scale, res.lse));
  }
}

// Backward epilogue for rows [r0, r1) of a tile starting at column v0 (lse is known, so tiles
// need not span whole rows).
template <typename X, typename A = typename AccOf<X>::type>
SAMI_AI void bwd_rows_impl(const RowArgs<A>& a, int64_t r0, int64_t r1, const A* lse,
                           const A* g) {
  for (int64_t r = r0; r < r1; ++r) {
    X* row = static_cast<X*>(a.buf) + r * a.cols;
    const int64_t y = a.targets[r];
    if (y == a.ignore_index) {
      zero_row(row, a.cols);
      continue;
    }
    const int64_t yl = (y >= a.v0 && y < a.v0 + a.cols) ? y - a.v0 : -1;
    row_grad(row, a.bias, a.scale, a.cols, yl, lse[r], sami::grad_coef(g[r], a.scale, lse[r]));
  }
}

SAMI_CPU_CLONES void fwd_rows_f32(const RowArgs<float>& a, int64_t r0, int64_t r1, bool want_u,
                                  float* logp, float* lse, float* s) {
  fwd_rows_impl<float>(a, r0, r1, want_u, logp, lse, s);
}
SAMI_CPU_CLONES void fwd_rows_bf16(const RowArgs<float>& a, int64_t r0, int64_t r1, bool want_u,
                                   float* logp, float* lse, float* s) {
  fwd_rows_impl<at::BFloat16>(a, r0, r1, want_u, logp, lse, s);
}
SAMI_CPU_CLONES void bwd_rows_f32(const RowArgs<float>& a, int64_t r0, int64_t r1, const float* lse,
                                  const float* g) {
  bwd_rows_impl<float>(a, r0, r1, lse, g);
}
SAMI_CPU_CLONES void bwd_rows_bf16(const RowArgs<float>& a, int64_t r0, int64_t r1, const float* lse,
                                   const float* g) {
  bwd_rows_impl<at::BFloat16>(a, r0, r1, lse, g);
}

// Epilogue dispatch on the buffer dtype: bf16 or float32 buffers accumulate in float,
// float64 buffers in double.
void fwd_rows(const RowArgs<float>& a, bool bf16, int64_t r0, int64_t r1, bool want_u, float* logp,
              float* lse, float* s) {
  if (bf16)
    fwd_rows_bf16(a, r0, r1, want_u, logp, lse, s);
  else
    fwd_rows_f32(a, r0, r1, want_u, logp, lse, s);
}
void fwd_rows(const RowArgs<double>& a, bool, int64_t r0, int64_t r1, bool want_u, double* logp,
              double* lse, double* s) {
  fwd_rows_impl<double>(a, r0, r1, want_u, logp, lse, s);
}
void bwd_rows(const RowArgs<float>& a, bool bf16, int64_t r0, int64_t r1, const float* lse,
              const float* g) {
  if (bf16)
    bwd_rows_bf16(a, r0, r1, lse, g);
  else
    bwd_rows_f32(a, r0, r1, lse, g);
}
void bwd_rows(const RowArgs<double>& a, bool, int64_t r0, int64_t r1, const double* lse,
              const double* g) {
  bwd_rows_impl<double>(a, r0, r1, lse, g);
}

// ----- float32 GEMMs ---------------------------------------------------------------
// at::mm runs float32 GEMMs in MKL, whose sgemm takes a generic AVX2 code path on AMD CPUs; oneDNN's
// matmul (bundled with ATen, which uses it for bfloat16) runs AVX-512 kernels there: 2-2.6x faster
// for this op's shapes on the AMD Zen development machine (benchmarks/RESULTS.md), with the same
// IEEE float32 arithmetic (another summation order).  ATen's entry point has no public header;
// it honours torch's float32 matmul precision setting like at::mm does.  Used when ATen was built
// with oneDNN and a first call succeeds (it refuses CPUs without AVX-512 (BW, VL, DQ) or
// AVX-NE-CONVERT); SAMI_KERNELS_ONEDNN=0 turns it off.
}  // namespace
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                             float beta, float alpha);
}  // namespace at::native
namespace {

bool onednn_float32() {
  static const bool usable = [] {
    const char* env = std::getenv("SAMI_KERNELS_ONEDNN");
    if ((env && std::strcmp(env, "0") == 0) || !at::hasMKLDNN()) return false;
    try {
      const at::Tensor a = at::ones({2, 2});
      at::native::mkldnn_matmul(a, a, at::empty({2, 2}), 0.0f, 1.0f);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return usable;
}

// out (+)= a @ b
void cpu_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (out.scalar_type() == at::kFloat && onednn_float32())
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  else if (accumulate)
    out.addmm_(a, b);
  else
    at::mm_out(out, a, b);
}

// ----- epilogue policy of the shared chunk loops (chunk_loop.h) ----------------
template <typename A>
RowArgs<A> row_args(const sami::LogitTile& t) {
  return {t.data, t.cols, t.v0, t.vocab, static_cast<const A*>(t.bias), static_cast<A>(t.scale),
          t.targets, t.ignore_index};
}

template <typename A>
void fwd_epilogue(const sami::LogitTile& t, A* logp, A* lse, A* s, bool want_u) {
  const RowArgs<A> a = row_args<A>(t);
  const bool bf16 = t.dtype == at::kBFloat16;
  at::parallel_for(0, t.rows, 1, [&](int64_t r0, int64_t r1) {
    fwd_rows(a, bf16, r0, r1, want_u, logp, lse, s);
  });
}

template <typename A>
void bwd_epilogue(const sami::LogitTile& t, const A* lse, const A* g) {
  const RowArgs<A> a = row_args<A>(t);
  const bool bf16 = t.dtype == at::kBFloat16;
  at::parallel_for(0, t.rows, 1, [&](int64_t r0, int64_t r1) {
    bwd_rows(a, bf16, r0, r1, lse, g);
  });
}

struct CpuEpilogue {
  static constexpr bool kUpcastHalf = true;  // see float16 at the top of the file
  static constexpr bool kTiledForward = true;
  static void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    cpu_gemm(std::move(out), a, b, accumulate);
  }
  static int64_t default_chunk_rows(int64_t V, int64_t elsize) {
    return (int64_t(32) << 20) / (V * elsize);  // 32 MiB logits buffer
  }
  static void check_targets(const at::Tensor& targets, int64_t ignore_index, int64_t V) {
    const int64_t* y = targets.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < targets.size(0); ++t)
      TORCH_CHECK_VALUE(y[t] == ignore_index || (y[t] >= 0 && y[t] < V), "targets[", t, "] = ", y[t],
                        " is outside [0, V=", V, ") and is not ignore_index=", ignore_index);
  }
  static void fwd(const sami::LogitTile& t, void* logp, void* lse, void* s, bool want_u) {
    if (t.dtype == at::kDouble)
      fwd_epilogue(t, static_cast<double*>(logp), static_cast<double*>(lse), static_cast<double*>(s),
                   want_u);
    else
      fwd_epilogue(t, static_cast<float*>(logp), static_cast<float*>(lse), static_cast<float*>(s),
                   want_u);
  }
  static void bwd(const sami::LogitTile& t, const void* lse, const void* g) {
    if (t.dtype == at::kDouble)
      bwd_epilogue(t, static_cast<const double*>(lse), static_cast<const double*>(g));
    else
      bwd_epilogue(t, static_cast<const float*>(lse), static_cast<const float*>(g));
  }
};

// ----- ops ----------------------------------------------------------------------
void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "expected CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden and weight must be 2-D");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden/weight hidden-size mismatch");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "hidden/weight must be contiguous");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "hidden must be float32, bfloat16, float16 or float64");
  TORCH_CHECK(weight.scalar_type() == dt, "hidden and weight must share a dtype");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V]");
    TORCH_CHECK(bias->scalar_type() == dt, "bias must share the hidden dtype");
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous");
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [T]");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK(targets.is_contiguous(), "targets must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double scale, bool want_u, int64_t chunk_rows,
    bool keep_logits) {
  check_inputs(hidden, weight, bias, targets);
  return sami::linear_logprobs_fwd<CpuEpilogue>(hidden, weight, bias, targets, ignore_index, scale,
                                                want_u, chunk_rows, keep_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp,
    int64_t ignore_index, double scale, bool need_dh, bool need_dw, bool need_db,
    int64_t chunk_rows, const c10::optional<at::Tensor>& logits) {
  check_inputs(hidden, weight, bias, targets);
  return sami::linear_logprobs_bwd<CpuEpilogue>(hidden, weight, bias, targets, lse, grad_logp,
                                                ignore_index, scale, need_dh, need_dw, need_db,
                                                chunk_rows, logits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sami_kernels_C, m) {
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "int ignore_index, float scale, bool want_u, int chunk_rows, bool keep_logits=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor lse, Tensor grad_logp, int ignore_index, float scale, bool need_dh, bool need_dw, "
      "bool need_db, int chunk_rows, Tensor(a!)? logits=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sami_kernels_C, CPU, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd_cpu);
}
