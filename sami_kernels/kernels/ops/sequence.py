"""Per-sequence log-probs and the whole SAMI loss: hidden states of response tokens -> [B, N, N] -> InfoNCE.

    seq[s] = sum (or mean) of logp[t] over tokens t with seq_ids[t] == s and targets[t] != ignore_index
    SAMI:  s = (b * N + i) * N + j  for query b, constitution i (row), response j (column);  M = seq.view(B, N, N)

The segment sum is deterministic on every device: a stable sort by sequence, then fixed-order sums (no atomics).
"""

from __future__ import annotations

import torch

from .. import backends
from .infonce import infonce_loss
from .linear_logprobs import check_values, host_validation, linear_logprobs

SEQ_REDUCTIONS = ("mean", "sum")


def _seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, on_host: bool) -> torch.Tensor:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [S + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )

    def describe(where):
        rule = f"cu_seqlens must rise from 0 to the number of tokens {num_tokens}"
        return rule if where is None else f"{rule}, got {cu_seqlens.tolist()}"

    bad = torch.cat([cu_seqlens[:1] != 0, cu_seqlens.diff() < 0, cu_seqlens[-1:] != num_tokens])
    check_values(bad, on_host, describe)
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)  # s such that cu[s] <= t < cu[s + 1]


def _register_segment_sum() -> bool:
    """Autograd and a fake implementation for the C++ op sami_kernels_C::segment_sum (CPU and CUDA kernels):
    sums[s] = sum of values[offsets[s] : offsets[s + 1]] in a fixed order; backward gathers grad_sums."""
    if backends.cpu_extension() is None:
        return False

    def setup_context(ctx, inputs, output):
        values, offsets = inputs
        ctx.save_for_backward(offsets)
        ctx.num_values = values.shape[0]

    def backward(ctx, grad_sums):
        (offsets,) = ctx.saved_tensors
        grad = torch.ops.sami_kernels_C.segment_sum_backward(grad_sums.contiguous(), offsets, ctx.num_values)
        return grad, None

    torch.library.register_autograd("sami_kernels_C::segment_sum", backward, setup_context=setup_context)
    torch.library.register_fake("sami_kernels_C::segment_sum")(
        lambda values, offsets: values.new_empty(offsets.shape[0] - 1)
    )
    torch.library.register_fake("sami_kernels_C::segment_sum_backward")(
        lambda grad_sums, offsets, num_values: grad_sums.new_empty(num_values)
    )
    return True


_HAS_SEGMENT_OP = _register_segment_sum()


def segment_sums(
    values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, *, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [num_seqs] in values' dtype, counts [num_seqs]) of values [T] grouped by seq_ids [T] (all >= 0; values
    of ids >= num_seqs are left out).

    Values are stably sorted by sequence, then each segment is summed in a fixed order: by the C++ / CUDA kernel
    (float64 accumulation) on the cpu and cuda backends, else as differences of float64 prefix sums. Segment ends
    come from a binary search of the sorted ids (no bincount: on a GPU it reads the largest id on the host)."""
    sorted_ids, order = torch.sort(seq_ids, stable=True)
    ends = torch.searchsorted(sorted_ids, torch.arange(num_seqs, device=seq_ids.device), right=True)
    offsets = torch.cat([ends.new_zeros(1), ends])
    counts = offsets.diff()
    if backend in ("cpu", "cuda") and _HAS_SEGMENT_OP:
        return torch.ops.sami_kernels_C.segment_sum(values[order].contiguous(), offsets), counts
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values[order].to(torch.float64).cumsum(0)])
    return (prefix[ends] - prefix[offsets[:-1]]).to(values.dtype), counts


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Sum or mean of per-token log p(target) for each sequence -> float32 [num_seqs] (float64 for float64 inputs).

    hidden [T, H], weight [V, H], targets [T]; tokens are grouped either by seq_ids [T] with values in
    [0, num_seqs) or -1 (skipped), or by cu_seqlens [S + 1] (packed sequences, S = num_seqs).
    Tokens whose target is ignore_index are not counted. reduction "mean" is SAMI's length normalisation.
    validate (see linear_logprobs) also covers seq_ids / cu_seqlens values and, for "mean", sequences without a
    scored token. With host validation (the default on CPU) tokens that are not scored are dropped before the matmul;
    without it (the default on a GPU: no host sync) their targets become ignore_index (computed, contributing 0).
    """
    if reduction not in SEQ_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEQ_REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a [T, H] tensor, got shape {getattr(hidden, 'shape', None)}")
    on_host = host_validation(validate, hidden.device)
    if (seq_ids is None) == (cu_seqlens is None):
        raise ValueError("pass exactly one of seq_ids (with num_seqs) or cu_seqlens")
    if cu_seqlens is not None:
        seq_ids = _seq_ids_from_cu_seqlens(cu_seqlens.to(hidden.device), hidden.shape[0], on_host)
        num_seqs = cu_seqlens.numel() - 1
    if not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs must be a positive int, got {num_seqs!r}")
    if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_ids must be an int64 or int32 tensor, got {getattr(seq_ids, 'dtype', type(seq_ids))}")
    if seq_ids.shape != targets.shape or targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"seq_ids {tuple(seq_ids.shape)} and targets {tuple(getattr(targets, 'shape', ()))} must "
            f"both have shape [T={hidden.shape[0]}]"
        )
    seq_ids = seq_ids.to(device=hidden.device, dtype=torch.int64)
    name = backends.resolve(hidden.device, backend)

    def describe_id(where):
        rule = f"outside [0, num_seqs={num_seqs}) and is not -1"
        return f"a seq_id is {rule}" if where is None else f"seq_ids[{where[0]}] = {int(seq_ids[where])} is {rule}"

    check_values((seq_ids < -1) | (seq_ids >= num_seqs), on_host, describe_id)
    scored = (seq_ids >= 0) & (targets != ignore_index)
    if not on_host:  # keep the shapes (dropping tokens needs their count on the host): summed into no sequence
        targets, seq_ids = torch.where(scored, targets, ignore_index), torch.where(scored, seq_ids, num_seqs)
    elif not bool(scored.all()):  # never compute logits for tokens nobody asked about
        idx = scored.nonzero()[:, 0]
        hidden, targets, seq_ids = hidden.index_select(0, idx), targets[idx], seq_ids[idx]
    logp = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        backend=name,
        chunk_bytes=chunk_bytes,
        validate=on_host,
    )
    sums, counts = segment_sums(logp, seq_ids, num_seqs, backend=name)
    if reduction == "sum":
        return sums

    def describe_empty(where):
        which = "a sequence" if where is None else f"sequence {where[0]}"
        return f"{which} has no scored token (reduction='mean' needs at least one)"

    check_values(counts == 0, on_host, describe_empty)
    return sums / counts.to(sums.dtype)


def sami_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    seq_ids: torch.Tensor,
    *,
    num_queries: int,
    num_constitutions: int,
    direction: str = "both",
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_bytes: int | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, M): SAMI's InfoNCE over M [B, N, N] = mean log p(response_j | constitution_i, query_b).

    hidden [T, H] are the final hidden states that predict the response tokens targets [T];
    seq_ids[t] = (b * N + i) * N + j names the (query, constitution, response) triple of token t, or -1.
    validate: see sequence_logprobs (the default never synchronises with the host on a GPU).
    """
    B, N = num_queries, num_constitutions
    if not isinstance(B, int) or B < 1:
        raise ValueError(f"num_queries must be a positive int, got {B!r}")
    if not isinstance(N, int) or N < 2:
        raise ValueError(f"num_constitutions must be an int >= 2 (InfoNCE contrasts N >= 2), got {N!r}")
    seq = sequence_logprobs(
        hidden,
        weight,
        targets,
        seq_ids,
        B * N * N,
        reduction="mean",
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        backend=backend,
        chunk_bytes=chunk_bytes,
        validate=validate,
    )
    M = seq.view(B, N, N)
    return infonce_loss(M, direction=direction, reduction=reduction, backend=backend), M


class SAMILoss(torch.nn.Module):
    """Module form of sami_loss: forward(hidden, weight, targets, seq_ids, num_queries, bias=None) -> (loss, M)."""

    def __init__(
        self,
        num_constitutions: int,
        *,
        direction: str = "both",
        ignore_index: int = -100,
        temperature: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.num_constitutions, self.direction = num_constitutions, direction
        self.ignore_index, self.temperature, self.backend = ignore_index, temperature, backend

    def forward(self, hidden, weight, targets, seq_ids, num_queries, bias=None):
        return sami_loss(
            hidden,
            weight,
            targets,
            seq_ids,
            num_queries=num_queries,
            num_constitutions=self.num_constitutions,
            direction=self.direction,
            bias=bias,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            backend=self.backend,
        )
