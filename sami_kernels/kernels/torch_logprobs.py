"""Pure-PyTorch backend of the fused linear log-prob: the same chunked algorithm as the C++ and Triton
backends, with the same signatures, so it runs anywhere (any device, float64 for gradcheck).

Every backend implements (ops/linear_logprobs.py states the math and the non-finite semantics):
    linear_logprobs_fwd(hidden [T,H], weight [V,H], bias [V]|None, targets [T], ignore_index, scale,
                        want_u, chunk_rows, keep_logits=False) -> (logp [T], lse [T], u [T,H] or empty,
                                                                   logits [T,V] or empty)
    linear_logprobs_bwd(hidden, weight, bias, targets, lse, grad_logp [T], ignore_index, scale,
                        need_dh, need_dw, need_db, chunk_rows, logits=None) -> (dh, dw, db), empty where not needed
Only a [chunk_rows, V] block of logits exists at any time, unless keep_logits (trainable weight, no u): then the
forward returns x = hidden @ weight.T [T, V] (in hidden's dtype; float32 for float16 on the cpu backend, which
computes it in float32), and the backward given it back skips recomputing it and may overwrite it (the C++
backends turn it into dz in place).
lse as the forward stores it (and the backward reads it), per row with target logit zt and L = logsumexp z:
    ignored row: 0;   L = +inf: NaN (logp NaN);   zt = -inf and L not NaN ("dead" row): +inf (logp -inf);   else L.
Rows whose gradient is zero by rule (ignored, dead: lse = +inf) get exactly 0 in dz, and also in dh, u and their dW
contribution whatever their hidden / weight values (0 * inf or NaN inside a GEMM would be NaN).
"""

from __future__ import annotations

import math

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(x, bias, scale, acc):
    """z = scale * (x + bias) in the accumulation dtype, from x = hidden @ weight.T."""
    z = x.to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    return z * scale


def _finish_rows(zt, lse):
    """(logp, stored lse) from the target logits and logsumexps of valid rows (the table above)."""
    plus_inf, dead = lse == math.inf, (zt == -math.inf) & ~lse.isnan()
    logp = torch.where(plus_inf, math.nan, torch.where(dead, -math.inf, zt - lse))
    return logp, torch.where(plus_inf, math.nan, torch.where(dead, math.inf, lse))


def _grad_logits(z, lse, targets, live, coef):
    """coef[t] * (onehot(y_t) - softmax(z_t)) on live rows, exactly 0 on the others; overwrites z."""
    dz = z.sub_(lse[:, None]).exp_().neg_()
    dz[live, targets[live]] += 1.0
    dz.mul_(coef[:, None])
    dz[~live] = 0.0
    return dz


def linear_logprobs_fwd(hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows, keep_logits=False):
    T, H = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    logp = torch.empty(T, dtype=acc, device=hidden.device)
    lse = torch.empty(T, dtype=acc, device=hidden.device)
    u = torch.empty(T, H, dtype=acc, device=hidden.device) if want_u else hidden.new_empty(0)
    logits = hidden.new_empty(T if keep_logits else 0, weight.shape[0])
    valid = targets != ignore_index
    step = max(T, 1) if keep_logits else chunk_rows
    for r0 in range(0, T, step):
        rows = slice(r0, min(T, r0 + step))
        x = torch.mm(hidden[rows], weight.T, out=logits[rows]) if keep_logits else hidden[rows] @ weight.T
        z = _scaled(x, bias, scale, acc)
        safe = torch.where(valid[rows], targets[rows], 0)
        logp[rows], lse[rows] = _finish_rows(z.gather(1, safe[:, None])[:, 0], torch.logsumexp(z, dim=-1))
        if want_u:
            live = valid[rows] & (lse[rows] != math.inf)
            dz = _grad_logits(z, lse[rows], targets[rows], live, torch.full_like(lse[rows], scale))
            u[rows] = (dz.to(weight.dtype) @ weight).to(acc)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    if want_u:
        u.masked_fill_(~(valid & (lse != math.inf))[:, None], 0.0)
    return torch.where(valid, logp, zero), torch.where(valid, lse, zero), u, logits


def linear_logprobs_bwd(
    hidden, weight, bias, targets, lse, grad_logp, ignore_index, scale, need_dh, need_dw, need_db, chunk_rows,
    logits=None,
):  # fmt: skip
    T = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else hidden.new_empty(0)
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_db else hidden.new_empty(0)
    lse = lse.to(acc)
    live = (targets != ignore_index) & (lse != math.inf)
    hidden = hidden.masked_fill(~live[:, None], 0.0)
    g = grad_logp.to(acc) * scale
    for r0 in range(0, T, chunk_rows):
        rows = slice(r0, min(T, r0 + chunk_rows))
        x = hidden[rows] @ weight.T if logits is None else logits[rows]
        dz = _grad_logits(_scaled(x, bias, scale, acc), lse[rows], targets[rows], live[rows], g[rows])
        dz_io = dz.to(hidden.dtype)
        if need_dh:
            dh[rows] = dz_io @ weight
        if need_dw:
            dw += (dz_io.T @ hidden[rows]).to(acc)
        if need_db:
            db += dz.sum(0)
    if need_dh:
        dh.masked_fill_(~live[:, None], 0.0)
    return dh, dw.to(weight.dtype) if need_dw else dw, db.to(bias.dtype) if need_db else db
