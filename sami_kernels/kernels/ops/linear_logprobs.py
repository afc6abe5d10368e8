"""Fused linear log-prob: per-token log p(target) without materialising the [tokens x vocab] logits.

    hidden h [T, H], weight W [V, H], bias b [V] (optional), targets y [T], scale s = 1 / temperature
    z[t, v]  = s * (h[t] . W[v] + b[v])
    logp[t]  = z[t, y[t]] - lse[t],   lse[t] = logsumexp_v z[t, v]          (0 where y[t] == ignore_index)
Backward for ANY upstream gradient g [T] (an InfoNCE over sequence sums is not a per-token sum):
    dz[t, v] = g[t] s (onehot(y[t])[v] - softmax(z[t])[v]);   dh = dz W,   dW = dz^T h,   db = sum_t dz[t]
Trainable weight: the forward keeps lse [T]; the backward recomputes logits chunk by chunk: 8THV FLOPs
(6THV when the float32 [T, V] logits fit in max_logits_bytes and are kept from the forward, cpu / cuda backends).
Frozen weight (and bias), the LoRA case: the forward also keeps u[t] = d logp[t] / d h[t] = W^T dz[t]|_{g=1}
([T, H]) and the backward is the row scaling g[:, None] * u: 4THV FLOPs on the chunked backends.
Outputs and accumulation are float32 (float64 for float64 inputs); dW is accumulated in that dtype too.
Non-finite inputs, the same on every backend and in reference.linear_logprobs: -inf logits are allowed (a -inf
bias bans or pads a token) and get probability 0 and gradient 0. A row whose target logit is -inf (every logit -inf
included) gives logp = -inf and contributes exactly 0 to dh, dW and db (the forward marks it lse = +inf). A NaN logit
(NaN in h[t], or in any row of W or entry of b, which reaches every row) or a +inf logit gives NaN for its rows.
Finite inputs give finite outputs at any magnitude. Ignored and dead rows contribute exactly 0 to every gradient,
whatever their values (their hidden rows are zeroed before the GEMMs, so no 0 * NaN reaches dW).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import backends, torch_logprobs
from ..torch_logprobs import accumulation_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEFAULT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}  # logits memory per device (chunk_bytes, max_logits_bytes)


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


def _budget(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a number of bytes >= 0 or None, got {value!r}")
    return value


def chunk_rows_for(num_tokens: int, vocab: int, device: torch.device, chunk_bytes: int | None) -> int:
    """Token rows per logits chunk so that a float32 [rows, V] block fits in chunk_bytes."""
    budget = _budget("chunk_bytes", chunk_bytes, DEFAULT_CHUNK_BYTES.get(device.type, 32 << 20))
    return max(1, min(max(num_tokens, 1), budget // (4 * vocab)))


def keeps_logits(num_tokens: int, vocab: int, device: torch.device, max_logits_bytes: int | None) -> bool:
    """Whether the forward may keep the whole [T, V] logits (counted as float32) for the backward."""
    budget = _budget("max_logits_bytes", max_logits_bytes, DEFAULT_CHUNK_BYTES.get(device.type, 32 << 20))
    return 4 * num_tokens * vocab <= budget


def _logits_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """dtype of the logits a chunked backend keeps: its GEMMs' (the cpu backend computes float16 in float32)."""
    return torch.float32 if backend == "cpu" and dtype == torch.float16 else dtype


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
    keep_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, u, logits): logits [T, V] kept for the backward with keep_logits (chunked backends), else [0, V]."""
    args = (hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows)
    if keep_logits:
        return tuple(_kernels(backend).linear_logprobs_fwd(*args, keep_logits))
    logp, lse, u, *_ = _kernels(backend).linear_logprobs_fwd(*args)  # the triton kernels return no logits
    return logp, lse, u, hidden.new_empty(0, weight.shape[0], dtype=_logits_dtype(hidden.dtype, backend))


@_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows, backend, keep_logits=False):
    acc = accumulation_dtype(hidden.dtype)
    T, H = hidden.shape
    u_shape = (T, H) if want_u else (0,)
    logits = hidden.new_empty(T if keep_logits else 0, weight.shape[0], dtype=_logits_dtype(hidden.dtype, backend))
    return (
        hidden.new_empty(T, dtype=acc),
        hidden.new_empty(T, dtype=acc),
        hidden.new_empty(u_shape, dtype=acc),
        logits,
    )


@torch.library.custom_op("sami_kernels::linear_logprobs_bwd", mutates_args=("logits",))
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
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db); logits: the forward's kept logits (overwritten with dz), or None to recompute them."""
    args = (hidden, weight, bias, targets, lse, grad_logp, ignore_index, scale, need_dh, need_dw, need_db, chunk_rows)
    kept = () if logits is None else (logits,)  # only the chunked backends keep logits
    return tuple(_kernels(backend).linear_logprobs_bwd(*args, *kept))


@_bwd.register_fake
def _(
    hidden, weight, bias, targets, lse, grad_logp, ignore_index, scale, need_dh, need_dw, need_db, chunk_rows, backend,
    logits=None,
):  # fmt: skip
    def maybe(flag, like):
        return torch.empty_like(like) if flag else hidden.new_empty(0)

    return maybe(need_dh, hidden), maybe(need_dw, weight), maybe(need_db and bias is not None, weight[:, 0])


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows, backend, keep_logits = inputs
    _, lse, u, logits = output
    ctx.set_materialize_grads(False)  # lse, u and logits get no gradient: no [T, V] zeros for logits
    ctx.options = (ignore_index, scale, chunk_rows, backend)
    ctx.want_u = want_u
    if want_u:
        ctx.save_for_backward(u)
        ctx.hidden_dtype = hidden.dtype
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        # Kept logits: the first backward overwrites them with dz (no second [T, V] buffer); a later backward of the
        # same graph (retain_graph) recomputes. Held detached: no reference cycle through the op's output.
        ctx.kept = [logits.detach()] if keep_logits else []


def _backward(ctx, grad_logp, _grad_lse, _grad_u, _grad_logits):
    nones = (None,) * 7  # targets, ignore_index, scale, want_u, chunk_rows, backend, keep_logits
    if grad_logp is None:  # no gradient reached logp (grads are not materialised)
        return None, None, None, *nones
    if ctx.want_u:  # frozen weight: d logp / d h was formed in the forward
        (u,) = ctx.saved_tensors
        return (grad_logp[:, None] * u).to(ctx.hidden_dtype), None, None, *nones
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, scale, chunk_rows, backend = ctx.options
    logits = ctx.kept.pop() if ctx.kept else None
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    dh, dw, db = _bwd(
        hidden, weight, bias, targets, lse, grad_logp.contiguous(), ignore_index, scale,
        need_dh, need_dw, need_db and bias is not None, chunk_rows, backend, logits,
    )  # fmt: skip
    pick = lambda flag, g: g if flag else None  # noqa: E731
    return pick(need_dh, dh), pick(need_dw, dw), pick(need_db, db), *nones


_fwd.register_autograd(_backward, setup_context=_setup_context)


def host_validation(validate, device: torch.device) -> bool:
    """The `validate` option of the public functions -> whether data checks read tensor values on the host.

    True: checks read the data on the host and raise ValueError naming the argument and its first bad entry (on a
    GPU, one device->host synchronisation per check). False: no host read, hence no synchronisation: the same checks
    run as device-side asserts (torch._assert_async), a RuntimeError on CPU and, on a GPU, a device-side assert
    reported at a later synchronisation that leaves the CUDA context unusable (as an out-of-range target does in
    F.cross_entropy). None (the default): True for CPU tensors, False for GPU tensors."""
    if validate is not None and not isinstance(validate, bool):
        raise ValueError(f"validate must be True, False or None, got {validate!r}")
    return device.type == "cpu" if validate is None else validate


def check_values(bad: torch.Tensor, on_host: bool, describe: Callable[[tuple[int, ...] | None], str]) -> None:
    """Data check: no entry of the boolean tensor `bad` may be set. on_host (see host_validation): ValueError with
    describe(index of the first bad entry); else torch._assert_async with describe(None) (under 255 characters)."""
    if not on_host:
        torch._assert_async(~bad.any(), describe(None))
    elif bool(bad.any()):
        raise ValueError(describe(tuple(int(i) for i in bad.nonzero()[0])))


def _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, validate):
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
    V = weight.shape[0]

    def describe(where):
        rule = f"outside [0, V={V}) and is not ignore_index={ignore_index}"
        return f"a target is {rule}" if where is None else f"targets{list(where)} = {int(targets[where])} is {rule}"

    on_host = host_validation(validate, hidden.device)
    check_values((targets != ignore_index) & ((targets < 0) | (targets >= V)), on_host, describe)


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
    max_logits_bytes: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Per-token log p(target) under logits = (hidden @ weight.T + bias) / temperature; 0 where target == ignore_index.

    hidden [..., H] and weight [V, H] (and bias [V]) in float32, bfloat16, float16 or float64; targets [...] int.
    Returns float32 (float64 for float64 inputs) of targets' shape; differentiable in hidden, weight and bias.
    chunk_bytes bounds the [rows, V] logits block of the chunked backends (default 32 MiB CPU, 512 MiB GPU).
    max_logits_bytes (default: chunk_bytes) is the memory the chunked backends may spend on keeping the logits from
    the forward for the backward of a trainable weight: when the whole [T, V] logits fit (counted as float32), they
    are computed as one block and kept, and the backward skips recomputing them: 6THV FLOPs instead of 8THV,
    exactly the same results, T * V elements held from the forward to the (first) backward, which reuses them.
    validate: how targets outside [0, V) that are not ignore_index are caught (shapes, dtypes and devices are always
    checked on the host, reading no data). None (default): ValueError on CPU tensors; on GPU tensors a device-side
    assert, so that the call never synchronises with the host. True: ValueError anywhere (a sync on a GPU). False:
    device-side assert anywhere. Details: host_validation.
    """
    _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, validate)
    name = backends.resolve(hidden.device, backend)  # the triton kernels refuse float64 (ValueError)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = targets.reshape(-1).to(torch.int64).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    frozen = weight.requires_grad is False and (bias is None or not bias.requires_grad)
    want_u = torch.is_grad_enabled() and h.requires_grad and frozen
    trainable = torch.is_grad_enabled() and not frozen
    rows = chunk_rows_for(h.shape[0], weight.shape[0], h.device, chunk_bytes)
    budget = chunk_bytes if max_logits_bytes is None else max_logits_bytes
    keep = trainable and name != "triton" and keeps_logits(h.shape[0], weight.shape[0], h.device, budget)
    logp, *_ = _fwd(h, weight, bias, y, int(ignore_index), 1.0 / float(temperature), want_u, rows, name, keep)
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
