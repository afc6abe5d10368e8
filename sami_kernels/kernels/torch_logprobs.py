"""Pure-PyTorch backend of the fused linear log-prob: the same chunked algorithm as the C++ and Triton
backends, with the same signatures, so it runs anywhere (any device, float64 for gradcheck).

Every backend implements (ops/linear_logprobs.py states the math):
    linear_logprobs_fwd(hidden [T,H], weight [V,H], bias [V]|None, targets [T], ignore_index, scale,
                        want_u, chunk_rows) -> (logp [T], lse [T], u [T,H] or empty)
    linear_logprobs_bwd(hidden, weight, bias, targets, lse, grad_logp [T], ignore_index, scale,
                        need_dh, need_dw, need_db, chunk_rows) -> (dh, dw, db), empty where not needed
Only a [chunk_rows, V] block of logits exists at any time.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden, weight, bias, scale, acc):
    z = (hidden @ weight.T).to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    return z * scale


def _grad_logits(z, lse, targets, valid, row_scale):
    """row_scale[t] * (onehot(y_t) - softmax(z_t)), zero on ignored rows; overwrites z."""
    dz = z.sub_(lse[:, None]).exp_().neg_()
    dz[valid, targets[valid]] += 1.0
    return dz.mul_(torch.where(valid, row_scale, 0.0)[:, None])


def linear_logprobs_fwd(hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows):
    T, H = hidden.shape
    acc = accumulation_dtype(hidden.dtype)
    logp = torch.empty(T, dtype=acc, device=hidden.device)
    lse = torch.empty(T, dtype=acc, device=hidden.device)
    u = torch.empty(T, H, dtype=acc, device=hidden.device) if want_u else hidden.new_empty(0)
    valid = targets != ignore_index
    for r0 in range(0, T, chunk_rows):
        rows = slice(r0, min(T, r0 + chunk_rows))
        z = _logits(hidden[rows], weight, bias, scale, acc)
        lse[rows] = torch.logsumexp(z, dim=-1)
        safe = torch.where(valid[rows], targets[rows], 0)
        logp[rows] = z.gather(1, safe[:, None])[:, 0] - lse[rows]
        if want_u:
            dz = _grad_logits(z, lse[rows], targets[rows], valid[rows], torch.full_like(lse[rows], scale))
            u[rows] = (dz.to(weight.dtype) @ weight).to(acc)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    return torch.where(valid, logp, zero), torch.where(valid, lse, zero), u


def linear_logprobs_bwd(
    hidden, weight, bias, targets, lse, grad_logp, ignore_index, scale, need_dh, need_dw, need_db, chunk_rows
):
    T = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else hidden.new_empty(0)
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_db else hidden.new_empty(0)
    valid = targets != ignore_index
    g = grad_logp.to(acc) * scale
    for r0 in range(0, T, chunk_rows):
        rows = slice(r0, min(T, r0 + chunk_rows))
        z = _logits(hidden[rows], weight, bias, scale, acc)
        dz = _grad_logits(z, lse[rows].to(acc), targets[rows], valid[rows], g[rows])
        dz_io = dz.to(hidden.dtype)
        if need_dh:
            dh[rows] = dz_io @ weight
        if need_dw:
            dw += (dz_io.T @ hidden[rows]).to(acc)
        if need_db:
            db += dz.sum(0)
    return dh, dw.to(weight.dtype) if need_dw else dw, db.to(bias.dtype) if need_db else db
