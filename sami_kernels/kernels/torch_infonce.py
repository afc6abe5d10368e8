"""Pure-PyTorch backend of the batched InfoNCE (ops/infonce.py states the math); same signature as the
C++ and Triton backends: infonce_fwd(M [B, N, N], direction) -> (loss [B], dM [B, N, N])."""

from __future__ import annotations

import torch


def infonce_fwd(M: torch.Tensor, direction: int):
    N = M.shape[-1]
    eye = torch.eye(N, dtype=M.dtype, device=M.device)
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    row = (torch.logsumexp(M, dim=-1) - diag).mean(-1)
    col = (torch.logsumexp(M, dim=-2) - diag).mean(-1)
    d_row = (torch.softmax(M, dim=-1) - eye) / N
    d_col = (torch.softmax(M, dim=-2) - eye) / N
    if direction == 0:
        return 0.5 * (row + col), 0.5 * (d_row + d_col)
    return (row, d_row) if direction == 1 else (col, d_col)
