"""The plain, obviously-correct math that every fast path is tested against.

Everything here materialises the full [tokens x vocab] logits and computes in the dtype it is given:
pass float64 tensors for the exact reference ("ref64"), or the caller's dtype for the
"torch in the same dtype" baseline of the test criterion |ours - ref64| <= |torch_same - ref64| + tol.
Autograd through these functions gives the reference gradients.

Notation (one query b, N constitutions, N responses; ../shared/docs/SAMI.md):
    z[t, v]  = (hidden[t] . weight[v] + bias[v]) / temperature
    logp[t]  = z[t, y[t]] - logsumexp_v z[t, v]                      (0 where y[t] == ignore_index)
               non-finite logits as every backend treats them (ops/linear_logprobs.py): -inf with zero
               gradient where z[t, y[t]] = -inf (and no logit of the row is NaN or +inf); NaN where one is
    seq[s]   = sum or mean of logp[t] over tokens t with seq_ids[t] == s
    M[b,i,j] = mean log p(response_j | constitution_i, query_b)       rows: constitutions, cols: responses
    L_b      = 1/2 [ mean_i (logsumexp_j M[b,i,j] - M[b,i,i]) + mean_j (logsumexp_i M[b,i,j] - M[b,j,j]) ]
"""

from __future__ import annotations

import math

import torch

DIRECTIONS = ("both", "row", "col")
REDUCTIONS = ("mean", "sum", "none")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log p(target): hidden [..., H], weight [V, H], targets [...] -> [...] in hidden's dtype.

    Rows that are ignored, or "dead" (target logit -inf, no NaN or +inf logit), take no part in the gradient: their
    logits and hidden rows are replaced by zeros, so that not even 0 * inf or 0 * NaN reaches dW."""

    def logits_of(h):
        z = h @ weight.T
        return (z if bias is None else z + bias) / temperature

    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)
    with torch.no_grad():
        z = logits_of(hidden)
        no_nan_or_inf = torch.logsumexp(z, dim=-1) < math.inf  # logsumexp: NaN with a NaN logit, +inf with +inf
        dead = valid & (z.gather(-1, safe_targets).squeeze(-1) == -math.inf) & no_nan_or_inf
        live = (valid & ~dead).unsqueeze(-1)
    logits = torch.where(live, logits_of(torch.where(live, hidden, 0.0)), 0.0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe_targets).squeeze(-1)
    return torch.where(live.squeeze(-1), logp, torch.where(dead, -math.inf, 0.0))


def sequence_sums(
    token_values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, *, reduction: str = "mean"
) -> torch.Tensor:
    """Per-sequence sum or mean of token_values [T] over tokens with seq_ids[t] == s (-1: skipped) -> [num_seqs]."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    keep = seq_ids >= 0
    ids = seq_ids[keep]
    sums = torch.zeros(num_seqs, dtype=token_values.dtype, device=token_values.device)
    sums = sums.index_add(0, ids, token_values[keep])
    if reduction == "sum":
        return sums
    counts = torch.bincount(ids, minlength=num_seqs).to(token_values.dtype)
    return sums / counts


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-sequence sum/mean of target log-probs; tokens with target == ignore_index are not counted."""
    logp = linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature)
    seq_ids = torch.where(targets == ignore_index, torch.full_like(seq_ids, -1), seq_ids)
    return sequence_sums(logp, seq_ids, num_seqs, reduction=reduction)


def infonce_loss(M: torch.Tensor, *, direction: str = "both", reduction: str = "mean") -> torch.Tensor:
    """SAMI's InfoNCE over M [B, N, N] (or [N, N]): rows = constitutions, cols = responses, positives on the diagonal.

    direction "row" contrasts each constitution's row, "col" each response's column, "both" averages the two.
    reduction "none" returns the per-query losses [B].
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    squeeze = M.dim() == 2
    if squeeze:
        M = M.unsqueeze(0)
    diag = torch.diagonal(M, dim1=-2, dim2=-1)  # [B, N]
    row = (torch.logsumexp(M, dim=-1) - diag).mean(-1)
    col = (torch.logsumexp(M, dim=-2) - diag).mean(-1)
    per_query = {"both": 0.5 * (row + col), "row": row, "col": col}[direction]
    if reduction == "mean":
        return per_query.mean()
    if reduction == "sum":
        return per_query.sum()
    return per_query[0] if squeeze else per_query


def mutual_information_lower_bound(loss: torch.Tensor, num_constitutions: int) -> torch.Tensor:
    """The InfoNCE bound SAMI reports: I(y; c | x) >= log N - L."""
    return torch.log(torch.tensor(float(num_constitutions), dtype=loss.dtype)) - loss


def pair_logprobs_naive(model, batch) -> torch.Tensor:
    """SAMI's matrix the way the reference code computes it: the N^2 sequences [prompt_i + response_j]
    right-padded, full-vocabulary logits at every position (float32), log_softmax, gather, mean over the
    response tokens -> [B, N, N]. `batch` is a PairBatch (prompt_ids[b][i], pair_ids[b][i][j])."""
    B, N = len(batch.prompt_ids), len(batch.prompt_ids[0])
    seqs = [(batch.prompt_ids[b][i], batch.pair_ids[b][i][j]) for b in range(B) for i in range(N) for j in range(N)]
    width = max(len(p) + len(r) for p, r in seqs)
    device = next(model.parameters()).device
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    scored = torch.zeros(len(seqs), width - 1, dtype=torch.bool)  # position t predicts token t + 1
    for s, (p, r) in enumerate(seqs):
        ids[s, : len(p) + len(r)] = torch.tensor(p + r)
        mask[s, : len(p) + len(r)] = 1
        scored[s, len(p) - 1 : len(p) + len(r) - 1] = True
    ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return ((logp * scored).sum(-1) / scored.sum(-1)).view(B, N, N)
