"""Triton kernels for the fused linear log-prob (logits never materialised).

    z[t, v]  = scale * (h[t] . W[v] + b[v])
    lse[t]   = logsumexp_v z[t, v]
    logp[t]  = z[t, y[t]] - lse[t]          (0 for rows with y[t] == ignore_index)

Forward: one fused kernel (`_lp_fwd_kernel`); each program owns BLOCK_T tokens
and one split of the vocabulary, streams BLOCK_V-wide vocab tiles (logits tile
computed by a K-loop of tl.dot over H) and keeps an online max / sum-exp and
the target logit.  It writes per-(split, token) partials which a tiny second
kernel (`_lp_merge_kernel`) merges into lse / logp.  No atomics: results are
bitwise deterministic.

Backward: `_lp_dlogits_kernel` recomputes a logits tile and writes
dz = g * scale * (onehot(y) - softmax(z)) for a chunk of rows into a
[rows, V] buffer; torch matmuls then produce dh = dz @ W,
dW += dz^T @ h, db += dz.sum(0).

Non-finite logits (the semantics are stated in ops/linear_logprobs.py):
- online logsumexp: exponents are taken against the running max m, or against 0
  while m = -inf, so all -inf tiles (and splits) add exp(-inf) = 0 instead of
  exp(-inf - (-inf)) = NaN.  tl.max / tl.maximum drop NaN on the GPU (the
  interpreter's tl.maximum keeps it), so m may or may not see a NaN logit, but
  the sum-exp always does (exp(NaN) = NaN) and no step replaces a NaN or zero
  sum: NaN propagates to lse and logp.  A +inf logit gives exp(inf - inf) = NaN.
- a "dead" row (target logit -inf, no NaN or +inf logit; all -inf rows included)
  gets logp = -inf and is marked by lse = +inf.  Dead and ignored rows take no part
  in the gradient (`_live_rows`): their dz rows are exactly 0 and their dh / u rows
  and hidden rows (for dW) are zeroed, so not even 0 * NaN or 0 * inf from a
  non-finite weight or hidden value reaches the results.

The public launchers have the same signatures as the C++ CPU backend; their keyword
arguments (block sizes, num_splits, group_t, input_precision) override the heuristics.
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_NUM_SMS_DEFAULT = 132


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    h_rows,
    w_ptr,
    b_ptr,
    offs_v,
    t_mask,
    v_mask,
    H,
    stride_w,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z = scale * (h @ W[offs_v]^T + b[offs_v]) for one [BLOCK_T, BLOCK_V] tile: K-loop over H in BLOCK_H steps,
    fp32 accumulator; h_rows points at the tile's hidden rows. Masked rows / columns read zeros."""
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_mask = offs_k < H
        a = tl.load(h_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & v_mask[None, :], other=0.0)
        if CAST_F32:  # the interpreter computes bf16 dots wrongly
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    return acc * scale


@triton.jit
def _lp_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    pm_ptr,
    ps_ptr,
    pt_ptr,
    T,
    H,
    V,
    stride_h,
    stride_w,
    ignore_index,
    scale,
    v_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    y = tl.load(y_ptr + offs_t, mask=t_mask, other=ignore_index).to(tl.int32)
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h

    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_T], tl.float32)
    t_i = tl.zeros([BLOCK_T], tl.float32)

    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_hi
        z = _logits_tile(
            h_rows,
            w_ptr,
            b_ptr,
            offs_v,
            t_mask,
            v_mask,
            H,
            stride_w,
            scale,
            HAS_BIAS,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            CAST_F32,
            DOT_PRECISION,
        )
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf - 0) = 0, not NaN
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(z - m_ref[:, None])  # NaN z -> NaN p -> NaN s
        s_i = s_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * T + offs_t
    tl.store(pm_ptr + out, m_i, mask=t_mask)
    tl.store(ps_ptr + out, s_i, mask=t_mask)
    tl.store(pt_ptr + out, t_i, mask=t_mask)


@triton.jit
def _lp_merge_kernel(
    pm_ptr,
    ps_ptr,
    pt_ptr,
    y_ptr,
    logp_ptr,
    lse_ptr,
    T,
    num_splits,
    ignore_index,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    t_mask = offs_t < T
    mask = (offs_s < num_splits)[:, None] & t_mask[None, :]
    idx = offs_s.to(tl.int64)[:, None] * T + offs_t[None, :]
    m = tl.load(pm_ptr + idx, mask=mask, other=float("-inf"))
    s = tl.load(ps_ptr + idx, mask=mask, other=0.0)
    tt = tl.load(pt_ptr + idx, mask=mask, other=0.0)

    mx = tl.max(m, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # every split all -inf: s = 0 there, exp(-inf - 0) = 0
    tot = tl.sum(s * tl.exp(m - mx[None, :]), axis=0)  # 0 for an all -inf row, NaN if a NaN was seen
    lse = mx + tl.log(tot)  # log(0) = -inf for an all -inf row
    tgt = tl.sum(tt, axis=0)
    dead = (tgt == float("-inf")) & (lse == lse)  # impossible target, no NaN in the row

    y = tl.load(y_ptr + offs_t, mask=t_mask, other=ignore_index)
    valid = t_mask & (y != ignore_index)
    logp = tl.where(dead, float("-inf"), tgt - lse)
    tl.store(logp_ptr + offs_t, tl.where(valid, logp, 0.0), mask=t_mask)
    tl.store(lse_ptr + offs_t, tl.where(valid, tl.where(dead, float("inf"), lse), 0.0), mask=t_mask)


@triton.jit
def _lp_dlogits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    live_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    R,
    H,
    V,
    stride_h,
    stride_w,
    stride_dz,
    scale,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_T: tl.constexpr,
    CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grouped ordering: GROUP_T token tiles sweep the vocab together (L2 reuse of W)
    pid = tl.program_id(0)
    n_t = tl.cdiv(R, BLOCK_T)
    n_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_T * n_v
    group = pid // per_group
    first_t = group * GROUP_T
    gsize = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % gsize
    pid_v = (pid % per_group) // gsize

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_mask = offs_t < R
    v_mask = offs_v < V

    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h
    z = _logits_tile(
        h_rows,
        w_ptr,
        b_ptr,
        offs_v,
        t_mask,
        v_mask,
        H,
        stride_w,
        scale,
        HAS_BIAS,
        BLOCK_T,
        BLOCK_V,
        BLOCK_H,
        CAST_F32,
        DOT_PRECISION,
    )

    y = tl.load(y_ptr + offs_t, mask=t_mask, other=-1).to(tl.int32)
    live = tl.load(live_ptr + offs_t, mask=t_mask, other=0) != 0  # _live_rows; the others get dz = 0 exactly
    lse = tl.load(lse_ptr + offs_t, mask=live, other=0.0)
    g = tl.load(g_ptr + offs_t, mask=live, other=0.0)

    p = tl.exp(tl.where(live[:, None], z - lse[:, None], float("-inf")))
    onehot = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    gs = tl.where(live, g * scale, 0.0)
    dz = gs[:, None] * (onehot - p)

    dz_ptrs = dz_ptr + offs_t.to(tl.int64)[:, None] * stride_dz + offs_v[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=t_mask[:, None] & v_mask[None, :])


# --------------------------------------------------------------------------
# launch heuristics (also used by sami_kernels.kernels.compile_check)
# --------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.cache
def _num_sms_for(index: int) -> int:
    try:
        return int(torch.cuda.get_device_properties(index).multi_processor_count)
    except Exception:  # pragma: no cover - no GPU / odd device
        return _NUM_SMS_DEFAULT


def _num_sms(t: Tensor) -> int:
    if t.is_cuda:
        return _num_sms_for(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return _NUM_SMS_DEFAULT


def _is_16bit(dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _block_h(H: int, half: bool) -> int:
    # Row strides divisible by 16 elements (Triton specialises them) give vectorised,
    # cp.async / TMA-friendly loads; otherwise every element needs its own 64-bit
    # address and the larger K tile spills registers, so take a shorter K step.
    if H % 16 == 0:
        return 64 if half else 32
    return 32 if half else 16


def _num_warps(block_t: int, half: bool) -> int:
    # fp32 (FMA dots) always 8 warps: with 4, ptxas caps registers and spills.
    return 4 if (half and block_t <= 32) else 8


def fwd_config(
    T: int,
    H: int,
    V: int,
    dtype,
    *,
    num_sms: int = _NUM_SMS_DEFAULT,
    block_t=None,
    block_v=None,
    block_h=None,
    num_splits=None,
    precision="ieee",
) -> dict:
    """Block sizes / grid for the fused forward kernel (precision: the DOT_PRECISION of float32 dots)."""
    half = _is_16bit(dtype)
    bt = block_t or min(128 if half else 64, max(16, _next_pow2(T)))
    bv = block_v or 128
    bh = block_h or _block_h(H, half)
    if block_h is None and not half and H % 16 and bt == 32 and precision == "ieee":
        # ptxas, given no register limit, caps this tile at 128 registers (2 CTAs / SM) and spills 16 bytes with the
        # K step of 16; it fits with 32 (sm_80 and sm_90, triton 3.7; with tf32 dots it is the other way round)
        bh = 32
    n_t = _cdiv(max(T, 1), bt)
    n_vt = _cdiv(max(V, 1), bv)
    if num_splits is None:
        # enough (token tile, vocab split) programs for ~2 waves on the GPU
        num_splits = max(1, min(n_vt, _cdiv(2 * num_sms, n_t)))
    num_splits = max(1, min(int(num_splits), n_vt))
    v_per_split = _cdiv(n_vt, num_splits) * bv
    num_splits = _cdiv(max(V, 1), v_per_split)  # every split non-empty
    num_warps = _num_warps(bt, half)
    return dict(
        BLOCK_T=bt,
        BLOCK_V=bv,
        BLOCK_H=bh,
        num_splits=num_splits,
        v_per_split=v_per_split,
        num_warps=num_warps,
        num_stages=3 if half else 2,
    )


def merge_config(T: int, num_splits: int) -> dict:
    bs = max(2, _next_pow2(num_splits))
    bt = max(2, min(128, 2048 // bs))
    return dict(BLOCK_T=bt, BLOCK_S=bs, num_warps=4)


def dlogits_config(R: int, H: int, V: int, dtype, *, block_t=None, block_v=None, block_h=None, group_t=None) -> dict:
    """Block sizes for the backward dlogits kernel (R = rows in the chunk)."""
    half = _is_16bit(dtype)
    bt = block_t or min(128 if half else 64, max(16, _next_pow2(R)))
    bv = block_v or 128
    bh = block_h or _block_h(H, half)
    num_warps = _num_warps(bt, half)
    return dict(
        BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, GROUP_T=group_t or 8, num_warps=num_warps, num_stages=3 if half else 2
    )


def _dz_dtype(dtype):
    return dtype if _is_16bit(dtype) else torch.float32


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp32_dot_precision() -> str:
    """tl.dot input_precision for float32 inputs, following torch's own switch for float32 CUDA matmuls:
    "tf32" once torch allows TF32 (torch.set_float32_matmul_precision("high" or "medium"), or
    torch.backends.cuda.matmul.fp32_precision = "tf32"), else "ieee" (torch's default, "highest").
    The torch matmuls of the backward (dh, dW, u) follow the same switch by themselves."""
    switch = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9: reflects both APIs
    if switch is not None:  # (get_float32_matmul_precision raises once both APIs were used)
        return "tf32" if switch == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _prep(hidden, weight, bias, targets):
    if hidden.dtype not in INPUT_DTYPES:
        raise ValueError(
            f"the triton backend takes float32, bfloat16 or float16 inputs, got {hidden.dtype} hidden; "
            "use backend='cpu', 'cuda' or 'torch'"
        )
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    if bias is not None and bias.numel() == 0:
        bias = None
    if bias is not None:
        bias = bias.contiguous()
    targets = targets.contiguous()
    return hidden, weight, bias, targets


def _launch_fwd(hidden, weight, bias, targets, ignore_index, scale, precision, *, num_splits, **blocks):
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = fwd_config(
        T, H, V, hidden.dtype, num_sms=_num_sms(hidden), num_splits=num_splits, precision=precision, **blocks
    )
    S = cfg["num_splits"]
    pm = torch.empty((S, T), dtype=torch.float32, device=dev)
    ps = torch.empty((S, T), dtype=torch.float32, device=dev)
    pt = torch.empty((S, T), dtype=torch.float32, device=dev)
    grid = (_cdiv(T, cfg["BLOCK_T"]), S)
    _lp_fwd_kernel[grid](
        hidden,
        weight,
        bias if bias is not None else hidden,
        targets,
        pm,
        ps,
        pt,
        T,
        H,
        V,
        hidden.stride(0),
        weight.stride(0),
        int(ignore_index),
        float(scale),
        cfg["v_per_split"],
        HAS_BIAS=bias is not None,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"],
        CAST_F32=_interpreting(),
        DOT_PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    logp = torch.empty(T, dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    mcfg = merge_config(T, S)
    _lp_merge_kernel[(_cdiv(T, mcfg["BLOCK_T"]),)](
        pm,
        ps,
        pt,
        targets,
        logp,
        lse,
        T,
        S,
        int(ignore_index),
        BLOCK_T=mcfg["BLOCK_T"],
        BLOCK_S=mcfg["BLOCK_S"],
        num_warps=mcfg["num_warps"],
    )
    return logp, lse


def _launch_dlogits(h_chunk, weight, bias, y_chunk, live_chunk, lse_chunk, g_chunk, dz, scale, precision, **blocks):
    R, H = h_chunk.shape
    V = weight.shape[0]
    cfg = dlogits_config(R, H, V, h_chunk.dtype, **blocks)
    grid = (_cdiv(R, cfg["BLOCK_T"]) * _cdiv(V, cfg["BLOCK_V"]),)
    _lp_dlogits_kernel[grid](
        h_chunk,
        weight,
        bias if bias is not None else h_chunk,
        y_chunk,
        live_chunk,
        lse_chunk,
        g_chunk,
        dz,
        R,
        H,
        V,
        h_chunk.stride(0),
        weight.stride(0),
        dz.stride(0),
        float(scale),
        HAS_BIAS=bias is not None,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"],
        GROUP_T=cfg["GROUP_T"],
        CAST_F32=_interpreting(),
        DOT_PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _mm_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b with accumulate, for a float32 `out` and fp32 accumulation, in place.
    16-bit a, b on CUDA use addmm's out_dtype overload: no temporary of out's size (dW is [V, H]). Without it
    (the CPU interpreter, torch < 2.8) the product is formed in the input dtype and then added."""
    beta = 1 if accumulate else 0
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
        return
    if a.is_cuda:
        try:
            torch.addmm(out, a, b, out_dtype=out.dtype, beta=beta, out=out)
            return
        except (RuntimeError, TypeError):  # torch without a float32-accumulator addmm.dtype_out
            pass
    product = torch.mm(a, b)
    if accumulate:
        out.add_(product)
    else:
        out.copy_(product)


def _live_rows(targets: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
    """Rows that get a gradient: not ignored and not dead (the forward stores lse = +inf; lse = -inf, torch's
    logsumexp of an all -inf row, counts as dead too). The others get exactly zero dz, dh, u and dW share."""
    return (targets != ignore_index) & (lse.abs() != math.inf)


def _chunk(chunk_rows: int, T: int) -> int:
    chunk_rows = int(chunk_rows)
    return T if chunk_rows <= 0 else min(chunk_rows, T)


def linear_logprobs_fwd(
    hidden,
    weight,
    bias,
    targets,
    ignore_index: int,
    scale: float,
    want_u: bool,
    chunk_rows: int,
    *,
    block_t=None,
    block_v=None,
    block_h=None,
    num_splits=None,
    group_t=None,
    input_precision=None,
):
    """Returns (logp [T] f32, lse [T] f32, u [T, H] f32 or empty). lse[t] = +inf marks a row whose target logit
    is -inf (logp = -inf, zero gradient). Keywords override the launch heuristics (group_t: the u pass);
    input_precision defaults to fp32_dot_precision()."""
    hidden, weight, bias, targets = _prep(hidden, weight, bias, targets)
    T, H = hidden.shape
    dev = hidden.device
    if T == 0:
        return (
            hidden.new_empty(0, dtype=torch.float32),
            hidden.new_empty(0, dtype=torch.float32),
            hidden.new_empty((0, H) if want_u else 0, dtype=torch.float32),
        )
    precision = input_precision or fp32_dot_precision()
    blocks = dict(block_t=block_t, block_v=block_v, block_h=block_h)
    logp, lse = _launch_fwd(
        hidden, weight, bias, targets, ignore_index, scale, precision, num_splits=num_splits, **blocks
    )
    if not want_u:
        return logp, lse, hidden.new_empty(0, dtype=torch.float32)

    V = weight.shape[0]
    u = torch.empty((T, H), dtype=torch.float32, device=dev)
    ones = torch.ones(T, dtype=torch.float32, device=dev)
    live = _live_rows(targets, lse, ignore_index)
    cr = _chunk(chunk_rows, T)
    dz_buf = torch.empty((cr, V), dtype=_dz_dtype(hidden.dtype), device=dev)
    for r0 in range(0, T, cr):
        r1 = min(r0 + cr, T)
        dz = dz_buf[: r1 - r0]
        rows = slice(r0, r1)
        _launch_dlogits(
            hidden[rows],
            weight,
            bias,
            targets[rows],
            live[rows],
            lse[rows],
            ones[rows],
            dz,
            scale,
            precision,
            group_t=group_t,
            **blocks,
        )
        _mm_into(u[rows], dz, weight, accumulate=False)
    u.masked_fill_(~live[:, None], 0.0)  # 0 * NaN / inf in W
    return logp, lse, u


def linear_logprobs_bwd(
    hidden,
    weight,
    bias,
    targets,
    lse,
    grad_logp,
    ignore_index: int,
    scale: float,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_rows: int,
    *,
    block_t=None,
    block_v=None,
    block_h=None,
    group_t=None,
    input_precision=None,
):
    """Returns (dh [T,H] hidden dtype, dw [V,H] weight dtype, db [V] bias dtype); each
    one not needed is an empty tensor of hidden's dtype. Keywords as in linear_logprobs_fwd."""
    hidden, weight, bias, targets = _prep(hidden, weight, bias, targets)
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_db = bool(need_db) and bias is not None

    dh = torch.empty((T, H), dtype=hidden.dtype, device=dev) if need_dh else None
    dw32 = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_dw else None
    db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None

    if T > 0 and (need_dh or need_dw or need_db):
        precision = input_precision or fp32_dot_precision()
        blocks = dict(block_t=block_t, block_v=block_v, block_h=block_h, group_t=group_t)
        lse = lse.to(device=dev, dtype=torch.float32).contiguous()
        g = grad_logp.to(device=dev, dtype=torch.float32).contiguous()
        live = _live_rows(targets, lse, ignore_index)
        cr = _chunk(chunk_rows, T)
        dz_buf = torch.empty((cr, V), dtype=_dz_dtype(hidden.dtype), device=dev)
        for r0 in range(0, T, cr):
            r1 = min(r0 + cr, T)
            dz = dz_buf[: r1 - r0]
            rows = slice(r0, r1)
            h_c = hidden[rows]
            _launch_dlogits(
                h_c, weight, bias, targets[rows], live[rows], lse[rows], g[rows], dz, scale, precision, **blocks
            )
            if need_dh:  # dz has the input dtype (float32, bfloat16 or float16), like W and h
                torch.mm(dz, weight, out=dh[rows])
            if need_dw:  # rows without a gradient may hold NaN / inf hidden values: 0 * NaN = NaN
                _mm_into(dw32, dz.t(), h_c.masked_fill(~live[rows, None], 0.0), accumulate=True)
            if need_db:
                db32.add_(dz.sum(0, dtype=torch.float32))
        if need_dh:
            dh.masked_fill_(~live[:, None], 0.0)  # 0 * NaN / inf in W

    out_dh = dh if need_dh else hidden.new_empty(0)  # distinct empties: a custom op's outputs may not alias
    out_dw = dw32.to(weight.dtype) if need_dw else hidden.new_empty(0)
    out_db = db32.to(bias.dtype) if need_db else hidden.new_empty(0)
    return out_dh, out_dw, out_db
