"""Triton kernel for the InfoNCE loss over per-query [N, N] log-prob matrices.

M[b, i, j]: rows i = constitutions, columns j = responses, positives on the diagonal.
    row term r_b = mean_i (logsumexp_j M[b,i,j] - M[b,i,i])
    col term c_b = mean_j (logsumexp_i M[b,i,j] - M[b,j,j])
direction 0 (both): loss = (r + c) / 2, dM = [(softmax_row - I) + (softmax_col - I)] / (2N)
direction 1 (row) : loss = r,           dM = (softmax_row - I) / N
direction 2 (col) : loss = c,           dM = (softmax_col - I) / N
One program per query b; the whole [N, N] matrix lives in one masked tile.
Computed in M's dtype: float32, or float64 (exact, for gradcheck).
"""

import torch
import triton
import triton.language as tl

from . import torch_infonce

Tensor = torch.Tensor


@triton.jit
def _infonce_kernel(m_ptr, loss_ptr, dm_ptr, N, DIRECTION: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keeps a single [BLOCK_N, BLOCK_N] tile (x) live: statistics first, then the
    # gradient is rebuilt from x in one expression (no spills up to BLOCK_N = 64).
    b = tl.program_id(0)
    base = b.to(tl.int64) * N * N
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    mask = valid[:, None] & valid[None, :]
    idx = base + offs[:, None] * N + offs[None, :]
    x = tl.load(m_ptr + idx, mask=mask, other=float("-inf"))
    pos = tl.load(m_ptr + base + offs * (N + 1), mask=valid, other=0.0)  # M[b, i, i]
    inv_n = 1.0 / N.to(x.dtype)  # weights in M's dtype (a float32 1/N would cap float64 at 1e-8)

    if DIRECTION == 0:
        w_row = 0.5 * inv_n
        w_col = 0.5 * inv_n
    elif DIRECTION == 1:
        w_row = inv_n
        w_col = 0.0
    else:
        w_row = 0.0
        w_col = inv_n

    loss = 0.0
    grad = tl.zeros([BLOCK_N, BLOCK_N], x.dtype)
    if DIRECTION != 2:
        # softmax over responses j for each constitution i
        rmax = tl.where(valid, tl.max(x, axis=1), 0.0)
        rsum = tl.where(valid, tl.sum(tl.exp(x - rmax[:, None]), axis=1), 1.0)
        lse_r = rmax + tl.log(rsum)
        loss += w_row * tl.sum(tl.where(valid, lse_r - pos, 0.0), axis=0)
        grad += tl.exp(x - rmax[:, None]) * (w_row / rsum)[:, None]
    if DIRECTION != 1:
        # softmax over constitutions i for each response j
        cmax = tl.where(valid, tl.max(x, axis=0), 0.0)
        csum = tl.where(valid, tl.sum(tl.exp(x - cmax[None, :]), axis=0), 1.0)
        lse_c = cmax + tl.log(csum)
        loss += w_col * tl.sum(tl.where(valid, lse_c - pos, 0.0), axis=0)
        grad += tl.exp(x - cmax[None, :]) * (w_col / csum)[None, :]
    grad = grad - tl.where(offs[:, None] == offs[None, :], w_row + w_col, 0.0)

    tl.store(loss_ptr + b, loss)
    tl.store(dm_ptr + idx, grad, mask=mask)


def infonce_config(N: int) -> dict:
    bn = max(2, triton.next_power_of_2(max(int(N), 1)))
    elems = bn * bn
    # ~8-16 fp32 elements per thread per live tile
    num_warps = max(1, min(16, elems // 512))
    return dict(BLOCK_N=bn, num_warps=num_warps)


# One [BLOCK_N, BLOCK_N] register tile per program: from BLOCK_N = 128 on it spills (float32: 500-850 bytes
# per thread, sm_80 and sm_90), so larger N (unusual: N = number of constitutions) falls back to the torch backend.
MAX_TRITON_N = 64


def infonce_fwd(M: Tensor, direction: int):
    """M [B, N, N] float32 or float64 -> (loss [B], dM [B, N, N]) in M's dtype."""
    if direction not in (0, 1, 2):
        raise ValueError(f"direction must be 0 (both), 1 (row) or 2 (col), got {direction}")
    if M.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the triton infonce kernel takes float32 or float64 M, got {M.dtype}")
    M = M.contiguous()
    B, N, N2 = M.shape
    assert N == N2, "M must be [B, N, N]"
    loss = torch.empty(B, dtype=M.dtype, device=M.device)
    dM = torch.empty_like(M)
    if B == 0 or N == 0:
        loss.zero_()
        return loss, dM
    if N > MAX_TRITON_N:
        return torch_infonce.infonce_fwd(M, direction)
    cfg = infonce_config(N)
    _infonce_kernel[(B,)](M, loss, dM, N, DIRECTION=int(direction), BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return loss, dM
