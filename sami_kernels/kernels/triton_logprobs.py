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

The public launchers have the same signatures as the C++ CPU backend.
"""

import functools
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
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
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
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(s * tl.exp(m - mx[None, :]), axis=0)
    tot = tl.where(tot > 0.0, tot, 1.0)
    lse = mx + tl.log(tot)
    tgt = tl.sum(tt, axis=0)

    y = tl.load(y_ptr + offs_t, mask=t_mask, other=ignore_index)
    valid = t_mask & (y != ignore_index)
    tl.store(logp_ptr + offs_t, tl.where(valid, tgt - lse, 0.0), mask=t_mask)
    tl.store(lse_ptr + offs_t, tl.where(valid, lse, 0.0), mask=t_mask)


@triton.jit
def _lp_dlogits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    R,
    H,
    V,
    stride_h,
    stride_w,
    stride_dz,
    ignore_index,
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

    y = tl.load(y_ptr + offs_t, mask=t_mask, other=ignore_index).to(tl.int32)
    lse = tl.load(lse_ptr + offs_t, mask=t_mask, other=0.0)
    g = tl.load(g_ptr + offs_t, mask=t_mask, other=0.0)
    valid = t_mask & (y != ignore_index)

    p = tl.exp(tl.where(valid[:, None], z - lse[:, None], float("-inf")))
    onehot = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    gs = tl.where(valid, g * scale, 0.0)
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
) -> dict:
    """Block sizes / grid for the fused forward kernel."""
    half = _is_16bit(dtype)
    bt = block_t or min(128 if half else 64, max(16, _next_pow2(T)))
    bv = block_v or 128
    bh = block_h or _block_h(H, half)
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


def _prep(hidden, weight, bias, targets):
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    if bias is not None and bias.numel() == 0:
        bias = None
    if bias is not None:
        bias = bias.contiguous()
    targets = targets.contiguous()
    return hidden, weight, bias, targets


def _launch_fwd(
    hidden,
    weight,
    bias,
    targets,
    ignore_index,
    scale,
    *,
    block_t=None,
    block_v=None,
    block_h=None,
    num_splits=None,
    input_precision="ieee",
):
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = fwd_config(
        T,
        H,
        V,
        hidden.dtype,
        num_sms=_num_sms(hidden),
        block_t=block_t,
        block_v=block_v,
        block_h=block_h,
        num_splits=num_splits,
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
        DOT_PRECISION=input_precision,
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


def _launch_dlogits(
    h_chunk,
    weight,
    bias,
    y_chunk,
    lse_chunk,
    g_chunk,
    dz,
    ignore_index,
    scale,
    *,
    block_t=None,
    block_v=None,
    block_h=None,
    input_precision="ieee",
):
    R, H = h_chunk.shape
    V = weight.shape[0]
    cfg = dlogits_config(R, H, V, h_chunk.dtype, block_t=block_t, block_v=block_v, block_h=block_h)
    grid = (_cdiv(R, cfg["BLOCK_T"]) * _cdiv(V, cfg["BLOCK_V"]),)
    _lp_dlogits_kernel[grid](
        h_chunk,
        weight,
        bias if bias is not None else h_chunk,
        y_chunk,
        lse_chunk,
        g_chunk,
        dz,
        R,
        H,
        V,
        h_chunk.stride(0),
        weight.stride(0),
        dz.stride(0),
        int(ignore_index),
        float(scale),
        HAS_BIAS=bias is not None,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"],
        GROUP_T=cfg["GROUP_T"],
        CAST_F32=_interpreting(),
        DOT_PRECISION=input_precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with a float32 result (fp32 accumulate; 16-bit inputs use out_dtype on CUDA)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a, b).float()


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
    input_precision="ieee",
):
    """Returns (logp [T] f32, lse [T] f32, u [T, H] f32 or empty)."""
    hidden, weight, bias, targets = _prep(hidden, weight, bias, targets)
    T, H = hidden.shape
    dev = hidden.device
    if T == 0:
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        u = (
            torch.empty((0, H), dtype=torch.float32, device=dev)
            if want_u
            else torch.empty(0, dtype=torch.float32, device=dev)
        )
        return empty, empty.clone(), u
    logp, lse = _launch_fwd(
        hidden,
        weight,
        bias,
        targets,
        ignore_index,
        scale,
        block_t=block_t,
        block_v=block_v,
        block_h=block_h,
        num_splits=num_splits,
        input_precision=input_precision,
    )
    if not want_u:
        return logp, lse, torch.empty(0, dtype=torch.float32, device=dev)

    V = weight.shape[0]
    u = torch.empty((T, H), dtype=torch.float32, device=dev)
    ones = torch.ones(T, dtype=torch.float32, device=dev)
    cr = _chunk(chunk_rows, T)
    dz_buf = torch.empty((cr, V), dtype=_dz_dtype(hidden.dtype), device=dev)
    for r0 in range(0, T, cr):
        r1 = min(r0 + cr, T)
        dz = dz_buf[: r1 - r0]
        _launch_dlogits(
            hidden[r0:r1],
            weight,
            bias,
            targets[r0:r1],
            lse[r0:r1],
            ones[r0:r1],
            dz,
            ignore_index,
            scale,
            block_t=block_t,
            block_v=block_v,
            block_h=block_h,
            input_precision=input_precision,
        )
        if dz.dtype == torch.float32:
            torch.mm(dz, weight, out=u[r0:r1])
        else:
            u[r0:r1].copy_(_mm_f32(dz, weight))
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
    input_precision="ieee",
):
    """Returns (dh [T,H] hidden dtype, dw [V,H] weight dtype, db [V] bias dtype); each
    one not needed is torch.empty(0)."""
    hidden, weight, bias, targets = _prep(hidden, weight, bias, targets)
    T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_db = bool(need_db) and bias is not None

    dh = torch.empty((T, H), dtype=hidden.dtype, device=dev) if need_dh else None
    dw32 = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_dw else None
    db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None

    if T > 0 and (need_dh or need_dw or need_db):
        lse = lse.to(device=dev, dtype=torch.float32).contiguous()
        g = grad_logp.to(device=dev, dtype=torch.float32).contiguous()
        cr = _chunk(chunk_rows, T)
        dz_buf = torch.empty((cr, V), dtype=_dz_dtype(hidden.dtype), device=dev)
        for r0 in range(0, T, cr):
            r1 = min(r0 + cr, T)
            dz = dz_buf[: r1 - r0]
            h_c = hidden[r0:r1]
            _launch_dlogits(
                h_c,
                weight,
                bias,
                targets[r0:r1],
                lse[r0:r1],
                g[r0:r1],
                dz,
                ignore_index,
                scale,
                block_t=block_t,
                block_v=block_v,
                block_h=block_h,
                input_precision=input_precision,
            )
            if need_dh:  # dz has the input dtype (float32, bfloat16 or float16), like W and h
                torch.mm(dz, weight, out=dh[r0:r1])
            if need_dw:
                if dz.dtype == torch.float32:
                    dw32.addmm_(dz.t(), h_c)
                else:
                    dw32.add_(_mm_f32(dz.t(), h_c))
            if need_db:
                db32.add_(dz.sum(0, dtype=torch.float32))

    empty = torch.empty(0, device=dev)
    out_dh = dh if need_dh else empty
    out_dw = (dw32 if weight.dtype == torch.float32 else dw32.to(weight.dtype)) if need_dw else empty
    out_db = (db32 if bias.dtype == torch.float32 else db32.to(bias.dtype)) if need_db else empty
    return out_dh, out_dw, out_db
