// Per-element math shared by the CPU kernels and (later) the CUDA kernels.
// No torch includes: plain C++ usable from host and device code.
//
// Fused linear log-prob (per token row t, vocabulary entry v):
//   z[v]   = scale * (h . W[v] + b[v])
//   lse    = log sum_v exp(z[v])                    (online, see OnlineLSE)
//   logp   = z[y] - lse                             (finish_row)
//   dz[v]  = coef * (onehot(y)[v] - exp(z[v] - lse)),   coef = g * scale (grad_coef)
// (with g = 1 this is the row of the frozen-weight vector u before the
//  product with W: u = dz @ W).
// Non-finite inputs (semantics: sami_kernels/kernels/ops/linear_logprobs.py): finish_row
// stores lse = +inf for a row whose target logit is -inf (p(target) = 0 exactly, all -inf
// rows included): its logp is -inf and grad_coef makes its gradient exactly 0; a +inf logit
// gives NaN logp and lse (NaN gradient), as a NaN logit does.
//
// InfoNCE on a score matrix M [N, N] (rows i = constitutions, columns j =
// responses, positives on the diagonal):
//   r = mean_i (logsumexp_j M[i,j] - M[i,i])      (row direction)
//   c = mean_j (logsumexp_i M[i,j] - M[j,j])      (column direction)
//   both: loss = (r + c) / 2,  dM = [(softmax_row(M) - I) + (softmax_col(M) - I)] / (2N)
//   row : loss = r,            dM = (softmax_row(M) - I) / N
//   col : loss = c,            dM = (softmax_col(M) - I) / N
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAMI_HOST_DEVICE __host__ __device__
#else
#define SAMI_HOST_DEVICE
#endif

namespace sami {

SAMI_HOST_DEVICE inline float math_exp(float x) { return ::expf(x); }
SAMI_HOST_DEVICE inline double math_exp(double x) { return ::exp(x); }
SAMI_HOST_DEVICE inline float math_log(float x) { return ::logf(x); }
SAMI_HOST_DEVICE inline double math_log(double x) { return ::log(x); }

// Online logsumexp state: the values seen so far satisfy sum exp(x) = s * exp(m).
// Empty state: m = -inf, s = 0.  Invariants: m is never NaN (NaN values only
// poison s), s stays 0 while every value seen is -inf.
template <typename acc_t>
struct OnlineLSE {
  acc_t m;
  acc_t s;

  SAMI_HOST_DEVICE OnlineLSE() : m(-INFINITY), s(acc_t(0)) {}
  SAMI_HOST_DEVICE OnlineLSE(acc_t m_, acc_t s_) : m(m_), s(s_) {}

  // Add one value x:  m' = max(m, x),  s' = s * exp(m - m') + exp(x - m').
  SAMI_HOST_DEVICE inline void update(acc_t x) {
    if (x > m) {                       // NaN never takes this branch
      s = s * math_exp(m - x) + acc_t(1);   // exp(-inf) = 0 for the empty state
      m = x;
    } else if (x != acc_t(-INFINITY)) {     // -inf contributes 0 (avoids -inf - -inf)
      s += math_exp(x - m);                 // NaN x -> NaN s
    }
  }

  // Merge a partial state (e.g. one block of a row, or another thread's part):
  //   m' = max(m_a, m_b),  s' = s_a * exp(m_a - m') + s_b * exp(m_b - m').
  SAMI_HOST_DEVICE inline void merge(const OnlineLSE& o) {
    const acc_t mm = o.m > m ? o.m : m;
    if (mm == acc_t(-INFINITY)) {      // both empty / all -inf so far
      s += o.s;                        // 0, or NaN if a NaN was seen
      return;
    }
    s = s * math_exp(m - mm) + o.s * math_exp(o.m - mm);
    m = mm;
  }

  // lse = m + log(s).  All -inf row: m = -inf, s = 0 -> -inf.  NaN seen -> NaN.
  SAMI_HOST_DEVICE inline acc_t finalize() const { return m + math_log(s); }
};

// z for one logit given the raw GEMM value x = h . W[v] and bias value b.
// acc_t: float for float32 / bfloat16 / float16 inputs, double for float64 inputs.
template <typename acc_t>
SAMI_HOST_DEVICE inline acc_t logit_value(acc_t x, acc_t b, acc_t scale) {
  return scale * (x + b);
}

// logp and the stored lse of a row, from its target logit zt and L = logsumexp_v z:
//   L = +inf (a +inf logit)          -> logp = NaN,  lse = NaN    (no finite answer)
//   zt = -inf and L not NaN (dead)   -> logp = -inf, lse = +inf   (marks a zero-gradient row)
//   otherwise                        -> logp = zt - L, lse = L    (a NaN logit: NaN, NaN)
template <typename acc_t>
struct RowLogp {
  acc_t logp, lse;
};

template <typename acc_t>
SAMI_HOST_DEVICE inline RowLogp<acc_t> finish_row(acc_t zt, acc_t L) {
  if (L == acc_t(INFINITY)) return {acc_t(NAN), acc_t(NAN)};
  if (zt == acc_t(-INFINITY) && L == L) return {acc_t(-INFINITY), acc_t(INFINITY)};
  return {zt - L, L};
}

// Row coefficient of dz: g * scale, exactly 0 for a dead row (stored lse = +inf; then
// exp(z - lse) = 0 for every z of the row, so its whole dz row is 0 whatever g is).
template <typename acc_t>
SAMI_HOST_DEVICE inline acc_t grad_coef(acc_t g, acc_t scale, acc_t lse) {
  return lse == acc_t(INFINITY) ? acc_t(0) : g * scale;
}

// Gradient of logp w.r.t. z for one element, scaled by the row coefficient:
//   dz = coef * (onehot - exp(z - lse)).
template <typename acc_t>
SAMI_HOST_DEVICE inline acc_t logprob_grad_value(acc_t coef, acc_t z, acc_t lse, bool is_target) {
  const acc_t p = math_exp(z - lse);
  return coef * ((is_target ? acc_t(1) : acc_t(0)) - p);
}

// ---------------------------------------------------------------------------
// InfoNCE for one score matrix, on plain pointers with strides.
// M element (i, j) is at M[i * si + j * sj]; dM likewise with dsi, dsj.
// direction: 0 = both, 1 = row, 2 = col.  Returns the loss; writes dM.
// Internals in acc_t (double on the CPU; N is tiny).  No scratch memory: the
// row part of dM is written first, then the column part is added.
// ---------------------------------------------------------------------------
template <typename acc_t, typename scalar_t>
SAMI_HOST_DEVICE inline acc_t infonce_line_lse(const scalar_t* p, int64_t n, int64_t stride) {
  OnlineLSE<acc_t> st;
  for (int64_t k = 0; k < n; ++k) st.update(static_cast<acc_t>(p[k * stride]));
  return st.finalize();
}

template <typename acc_t, typename scalar_t>
SAMI_HOST_DEVICE inline acc_t infonce_matrix(const scalar_t* M, int64_t N, int64_t si, int64_t sj,
                                             int direction, scalar_t* dM, int64_t dsi,
                                             int64_t dsj) {
  const bool use_row = direction == 0 || direction == 1;
  const bool use_col = direction == 0 || direction == 2;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
  // weight of each direction in loss and gradient
  const acc_t w = (use_row && use_col) ? acc_t(0.5) : acc_t(1);
  acc_t loss = 0;
  // Row direction: softmax over j for each i.
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t* line = M + i * si;
    acc_t lse = use_row ? infonce_line_lse<acc_t>(line, N, sj) : acc_t(0);
    if (use_row) loss += w * inv_n * (lse - static_cast<acc_t>(line[i * sj]));
    for (int64_t j = 0; j < N; ++j) {
      acc_t d = 0;
      if (use_row) {
        d = w * inv_n *
            (math_exp(static_cast<acc_t>(line[j * sj]) - lse) - (i == j ? acc_t(1) : acc_t(0)));
      }
      dM[i * dsi + j * dsj] = static_cast<scalar_t>(d);
    }
  }
  if (use_col) {
    // Column direction: softmax over i for each j.
    for (int64_t j = 0; j < N; ++j) {
      const scalar_t* line = M + j * sj;
      const acc_t lse = infonce_line_lse<acc_t>(line, N, si);
      loss += w * inv_n * (lse - static_cast<acc_t>(line[j * si]));
      for (int64_t i = 0; i < N; ++i) {
        const acc_t d = w * inv_n *
            (math_exp(static_cast<acc_t>(line[i * si]) - lse) - (i == j ? acc_t(1) : acc_t(0)));
        scalar_t* out = dM + i * dsi + j * dsj;
        *out = static_cast<scalar_t>(static_cast<acc_t>(*out) + d);
      }
    }
  }
  return loss;
}

}  // namespace sami
