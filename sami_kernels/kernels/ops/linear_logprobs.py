"""Fused linear log-prob: per-token log p(target) without materialising the [tokens x vocab] logits.

    hidden h [T, H], weight W [V, H], bias b [V] (optional), targets y [T], scale s = 1 / temperature
    z[t, v]  = s * (h[t] . W[v] + b[v])
    logp[t]  = z[t, y[t]] - lse[t],   lse[t] = logsumexp_v z[t, v]          (0 where y[t] == ignore_index)
Backward for ANY upstream gradient g [T] (an InfoNCE over sequence sums is not a per-token sum):
    dz[t, v] = g[t] s (onehot(y[t])[v] - softmax(z[t])[v]);   dh = dz W,   dW = dz^T h,   db = sum_t dz[t]
Trainable weight: the forward keeps lse [T]; the backward recomputes logits chunk by chunk: 8THV FLOPs.
Frozen weight (and bias), the LoRA case: the forward also keeps u[t] = d logp[t] / d h[t] = W^T dz[t]|_{g=1}
([T, H]) and the backward is the row scaling g[:, None] * u: 4THV FLOPs on the chunked backends.
Outputs and accumulation are float32 (float64 for float64 inputs); dW is accumulated in that dtype too.
"""

from __future__ import annotations

import math

import torch

from .. import backends, torch_logprobs
from ..torch_logprobs import accumulation_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEFAULT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}


def _kernels(backend: str):
    """The module (or torch.ops namespace) with linear_logprobs_fwd / linear_logprobs_bwd for a backend."""
    if backend == "torch":
        return torch_logprobs
    if backend in ("cpu", "cuda"):  # same ops; the CUDA extension registers their CUDA dispatch-key kernels
        backends.cpu_extension()
        return torch.ops.sami_kernels_C
    if backend == "triton":
        from .. import triton_logprobs

        return triton_logprobs
    raise ValueError(f"backend {backend!r} has no linear_logprobs kernels")


def chunk_rows_for(num_tokens: int, vocab: int, device: torch.device, chunk_bytes: int | None) -> int:
    """Token rows per logits chunk so that a float32 [rows, V] block fits in chunk_bytes."""
    budget = chunk_bytes if chunk_bytes is not None else DEFAULT_CHUNK_BYTES.get(device.type, 32 << 20)
    return max(1, min(max(num_tokens, 1), budget // (4 * vocab)))


@torch.library.custom_op("sami_kernels::linear_logprobs_fwd", mutates_args=())
def _fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    scale: float,
    want_u: bool,
    chunk_rows: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(
        _kernels(backend).linear_logprobs_fwd(hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows)
    )


@_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows, backend):
    acc = accumulation_dtype(hidden.dtype)
    T, H = hidden.shape
    u_shape = (T, H) if want_u else (0,)
    return (hidden.new_empty(T, dtype=acc), hidden.new_empty(T, dtype=acc), hidden.new_empty(u_shape, dtype=acc))


@torch.library.custom_op("sami_kernels::linear_logprobs_bwd", mutates_args=())
def _bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    scale: float,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_rows: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(
        _kernels(backend).linear_logprobs_bwd(
            hidden, weight, bias, targets, lse, grad_logp, ignore_index, scale, need_dh, need_dw, need_db, chunk_rows
        )
    )


@_bwd.register_fake
def _(
    hidden, weight, bias, targets, lse, grad_logp, ignore_index, scale, need_dh, need_dw, need_db, chunk_rows, backend
):
    def maybe(flag, like):
        return torch.empty_like(like) if flag else hidden.new_empty(0)

    return maybe(need_dh, hidden), maybe(need_dw, weight), maybe(need_db and bias is not None, weight[:, 0])


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows, backend = inputs
    _, lse, u = output
    ctx.options = (ignore_index, scale, chunk_rows, backend)
    ctx.want_u = want_u
    if want_u:
        ctx.save_for_backward(u)
        ctx.hidden_dtype = hidden.dtype
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, lse)


def _backward(ctx, grad_logp, _grad_lse, _grad_u):
    if ctx.want_u:  # frozen weight: d logp / d h was formed in the forward
        (u,) = ctx.saved_tensors
        return (grad_logp[:, None] * u).to(ctx.hidden_dtype), None, None, None, None, None, None, None, None
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, scale, chunk_rows, backend = ctx.options
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    dh, dw, db = _bwd(
        hidden, weight, bias, targets, lse, grad_logp.contiguous(), ignore_index, scale,
        need_dh, need_dw, need_db and bias is not None, chunk_rows, backend,
    )  # fmt: skip
    pick = lambda flag, g: g if flag else None  # noqa: E731
    return pick(need_dh, dh), pick(need_dw, dw), pick(need_db, db), None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(hidden, weight, targets, bias, ignore_index, temperature):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"hidden must be a tensor of shape [..., H], got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [V, H] tensor, got shape {getattr(weight, 'shape', None)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H={hidden.shape[-1]}] and weight [V, H={weight.shape[1]}] disagree on H")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 or int32 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V={weight.shape[0]}], got {getattr(bias, 'shape', None)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"targets{list(where)} = {int(targets[where])} is outside [0, V={weight.shape[0]}) "
            f"and is not ignore_index={ignore_index}"
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Per-token log p(target) under logits = (hidden @ weight.T + bias) / temperature; 0 where target == ignore_index.

    hidden [..., H] and weight [V, H] (and bias [V]) in float32, bfloat16, float16 or float64; targets [...] int.
    Returns float32 (float64 for float64 inputs) of targets' shape; differentiable in hidden, weight and bias.
    chunk_bytes bounds the [rows, V] logits block of the chunked backends (default 32 MiB CPU, 512 MiB GPU).
    """
    _check_inputs(hidden, weight, targets, bias, ignore_index, temperature)
    name = backends.resolve(hidden.device, backend)
    if name == "triton" and hidden.dtype == torch.float64:
        raise ValueError(
            "the triton backend takes float32, bfloat16 or float16 inputs, got float64; "
            "use backend='cpu', 'cuda' or 'torch'"
        )
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = targets.reshape(-1).to(torch.int64).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    frozen = weight.requires_grad is False and (bias is None or not bias.requires_grad)
    want_u = torch.is_grad_enabled() and h.requires_grad and frozen
    rows = chunk_rows_for(h.shape[0], weight.shape[0], h.device, chunk_bytes)
    logp, _, _ = _fwd(h, weight, bias, y, int(ignore_index), 1.0 / float(temperature), want_u, rows, name)
    return logp.reshape(shape)


class LinearLogprobs(torch.nn.Module):
    """Module form of linear_logprobs: holds the options; forward(hidden, weight, targets, bias=None)."""

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.ignore_index, self.temperature, self.backend = ignore_index, temperature, backend

    def forward(self, hidden, weight, targets, bias=None):
        return linear_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            backend=self.backend,
        )
