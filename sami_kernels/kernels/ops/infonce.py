"""SAMI's batched InfoNCE over the [B, N, N] matrix of sequence log-probs (rows: constitutions, cols: responses).

    r_b = mean_i (logsumexp_j M[b,i,j] - M[b,i,i])          row term: which response fits constitution i
    c_b = mean_j (logsumexp_i M[b,i,j] - M[b,j,j])          col term: which constitution produced response j
    loss_b = (r_b + c_b) / 2 ("both"), r_b ("row") or c_b ("col")
    dloss_b/dM[b] = 1/(2N) [(softmax_row(M[b]) - I) + (softmax_col(M[b]) - I)] for "both"; (softmax_dir - I)/N else
The kernel returns loss [B] and dM [B, N, N] in one pass (N is small); the backward scales dM by the upstream
gradient. Math in float32 (float64 for float64 M).
"""

from __future__ import annotations

import torch

from .. import backends, torch_infonce

DIRECTIONS = {"both": 0, "row": 1, "col": 2}
REDUCTIONS = ("mean", "sum", "none")


def _kernels(backend: str):
    if backend == "torch":
        return torch_infonce
    if backend in ("cpu", "cuda"):  # same ops; the CUDA extension registers their CUDA dispatch-key kernels
        backends.cpu_extension()
        return torch.ops.sami_kernels_C
    if backend == "triton":
        from .. import triton_infonce

        return triton_infonce
    raise ValueError(f"backend {backend!r} has no infonce kernels")


@torch.library.custom_op("sami_kernels::infonce_fwd", mutates_args=())
def _fwd(M: torch.Tensor, direction: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_kernels(backend).infonce_fwd(M, direction))


@_fwd.register_fake
def _(M, direction, backend):
    return M.new_empty(M.shape[0]), torch.empty_like(M)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_dM):
    (dM,) = ctx.saved_tensors
    return dM * grad_loss[:, None, None], None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def infonce_loss(
    M: torch.Tensor, *, direction: str = "both", reduction: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    """InfoNCE over M [B, N, N] or [N, N] (any float dtype; computed in float32, float64 stays float64).

    direction: "both" | "row" | "col";  reduction: "mean" | "sum" over queries, or "none" -> [B] (or scalar for [N, N]).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {tuple(DIRECTIONS)}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(M, torch.Tensor) or M.dim() not in (2, 3) or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must be a square [N, N] or [B, N, N] tensor, got shape {getattr(M, 'shape', None)}")
    if not M.is_floating_point():
        raise ValueError(f"M must be a floating-point tensor, got {M.dtype}")
    if M.shape[-1] < 2:
        raise ValueError(f"InfoNCE needs N >= 2 constitutions per query, got N = {M.shape[-1]}")
    squeeze = M.dim() == 2
    batched = (M.unsqueeze(0) if squeeze else M).to(torch.float64 if M.dtype == torch.float64 else torch.float32)
    name = backends.resolve(M.device, backend)
    per_query, _ = _fwd(batched.contiguous(), DIRECTIONS[direction], name)
    if reduction == "mean":
        return per_query.mean()
    if reduction == "sum":
        return per_query.sum()
    return per_query[0] if squeeze else per_query
