"""The Triton kernels called through their launchers with small blocks, so that every grid dimension has several
entries with ragged tails (forward: token tiles x vocabulary splits x vocabulary tiles, merged; backward: token
tiles x vocabulary tiles in grouped order over several groups), on what fused kernels get wrong: masked (-inf)
vocabularies, NaN / +inf anywhere, logits in the hundreds, output dtypes, TF32 selection, float64 InfoNCE.

Expected values: sami_kernels.kernels.reference in float64, which implements the non-finite semantics of
ops/linear_logprobs.py (a row whose target logit is -inf, with no NaN / +inf logit, gets logp = -inf; it and the
ignored rows take no part in the gradient; NaN propagates), judged with the criterion of
helpers.assert_close_to_ref after the non-finite pattern (NaN, +inf, -inf separately) is checked exactly.

Under the interpreter, the elementwise NaN-dropping max (tl.maximum, the GPU's maxnum) is emulated as on the GPU
(numpy's maximum would propagate NaN and hide NaN-dropping bugs)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_close_to_ref, random_upstream

import sami_kernels as sk
from sami_kernels import backends, reference
from sami_kernels.kernels import torch_infonce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in backends.usable(DEVICE), reason="triton cannot run here")
if "triton" in backends.usable(DEVICE):
    from sami_kernels.kernels import triton_infonce, triton_logprobs

INF = float("inf")
# 16 is the smallest tl.dot dimension a GPU compiles. Forward: 4 vocabulary splits of 16-wide tiles.
# Backward (and the frozen-weight u pass): GROUP_T = 2 token tiles per group.
FWD = dict(block_t=16, block_v=16, block_h=16, num_splits=4, group_t=2)
BWD = dict(block_t=16, block_v=32, block_h=16, group_t=2)


@pytest.fixture(autouse=True)
def _gpu_nan_max(monkeypatch):
    if backends.triton_interpreting():
        from triton.runtime import interpreter

        monkeypatch.setattr(
            interpreter.InterpreterBuilder, "create_maxnumf", lambda self, a, b: self.binary_op(a, b, np.fmax)
        )


def make(T, H, V, *, scale_h=1.0, scale_w=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=torch.float64) * scale_h
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * scale_w
    b = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (T,), generator=g)
    y[3::7] = -100
    return h, w, b, y


def reference_grads(h, w, b, y, scale, g):
    """logp and (dh, dW, db) of the reference math in h's dtype, for the upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    logp = reference.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], temperature=1 / scale)
    return logp.detach(), torch.autograd.grad(logp, leaves, g.to(logp.dtype))


def assert_same_nonfinite(ours, ref, name):
    for kind, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, r = mask(ours.detach().cpu()), mask(ref.detach().cpu())
        assert torch.equal(a, r), (
            f"{name}: {kind} at {a.nonzero().flatten().tolist()}, expected {r.nonzero().flatten().tolist()}"
        )


def check_kernels(h64, w64, b64, y, dtype, *, scale=0.7, chunk_rows=0, rtol=None):
    """Forward (with the frozen-weight u) and backward launchers vs the float64 reference; rows without a gradient
    (ignored, dead) exactly zero in dh and u, and dead rows marked lse = +inf. Returns (logp, grads) on the CPU."""
    h, w, b = (t.to(dtype).to(DEVICE) for t in (h64, w64, b64))
    g64 = random_upstream(y.double())
    ref = reference_grads(h64, w64, b64, y, scale, g64)
    same = reference_grads(h.cpu(), w.cpu(), b.cpu(), y, scale, g64)
    rtol = rtol if rtol is not None else (1e-5 if dtype == torch.float32 else 2e-2)

    yd = y.to(DEVICE)
    logp, lse, u = triton_logprobs.linear_logprobs_fwd(h, w, b, yd, -100, scale, True, chunk_rows, **FWD)
    grads = triton_logprobs.linear_logprobs_bwd(
        h, w, b, yd, lse, g64.float().to(DEVICE), -100, scale, True, True, True, chunk_rows, **BWD
    )
    logp, lse, u, grads = logp.cpu(), lse.cpu(), u.cpu(), [t.cpu() for t in grads]
    assert logp.dtype == lse.dtype == u.dtype == torch.float32 and all(t.dtype == dtype for t in grads)
    assert_same_nonfinite(logp, ref[0], "logp")
    assert_close_to_ref(logp, ref[0], same[0].float(), dtype=dtype, name="logp", rtol=rtol / 10)
    for name, ours, r, s in zip(("dh", "dw", "db"), grads, ref[1], same[1], strict=True):
        assert_same_nonfinite(ours, r, name)
        assert_close_to_ref(ours, r, s, dtype=dtype, name=name, rtol=rtol)
    dh_frozen = u * g64.float()[:, None]  # the frozen-weight backward: g * u
    assert_same_nonfinite(dh_frozen, ref[1][0], "u")
    assert_close_to_ref(dh_frozen, ref[1][0], same[1][0], dtype=dtype, name="u", rtol=rtol)
    dead = ref[0] == -INF
    no_grad = dead | (y == -100)
    assert bool((logp[y == -100] == 0).all() and (lse[dead] == INF).all()), "ignored: 0; dead: lse = +inf"
    assert not grads[0][no_grad].any() and not u[no_grad].any(), "rows without a gradient must have exactly 0"
    return logp, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_vocabulary(dtype):
    """The user's repro (T=40, H=24, V=900, bias[:600] = -inf) on a larger grid: whole -inf tiles and whole -inf
    splits before the first finite logit, a split that mixes both, targets in the masked part (logp -inf, no
    gradient), ignored rows. One backward chunk of 5 token tiles = 3 groups of 2."""
    h, w, b, y = make(70, 24, 900)
    b[:600] = -INF
    y = torch.where(y == -100, y, 600 + y % 300)
    y[[1, 12, 40]] = torch.tensor([5, 599, 300])  # impossible targets
    logp, _ = check_kernels(h, w, b, y, dtype)
    dead = torch.zeros(70, dtype=torch.bool)
    dead[[1, 12, 40]] = True
    assert torch.isfinite(logp[~dead]).all() and (logp[dead] == -INF).all()


def test_all_logits_minus_inf_gives_minus_inf_and_zero_gradient():
    h, w, b, y = make(37, 20, 70)
    b[:] = -INF
    logp, (dh, dw, db) = check_kernels(h, w, b, y, torch.float32, chunk_rows=20)
    assert bool((logp[y != -100] == -INF).all() and (logp[y == -100] == 0).all())
    assert not dh.any() and not dw.any() and not db.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("where", ["weight", "bias", "hidden", "posinf_bias", "masked_weight", "ignored_hidden"])
def test_nan_and_inf_propagate(where):
    """One NaN (or +inf) logit source: its rows get NaN logp and gradients, never finite numbers; other rows exact.
    Rows without a gradient (ignored, dead) keep exactly zero dh / u rows even with a NaN weight, and their own
    non-finite hidden values reach nothing (ignored_hidden: every result finite)."""
    h, w, b, y = make(40, 20, 200)
    b[:90] = -INF  # NaN must beat -inf tiles too
    y = torch.where(y == -100, y, 90 + y % 110)
    y[5] = 10  # one dead row (stays dead unless the NaN reaches every row)
    target_rows = set(y.tolist())
    free = next(v for v in range(100, 200) if v not in target_rows)
    if where == "weight":
        w[free, 4] = float("nan")
    elif where == "bias":
        b[free] = float("nan")
    elif where == "posinf_bias":
        b[free] = INF
    elif where == "masked_weight":
        w[20, 3] = float("nan")  # a row whose bias is -inf: NaN + -inf = NaN
    elif where == "hidden":
        h[8, 2] = h[3, 5] = float("nan")  # row 3 is ignored
    else:
        h[3, 5], h[10, 1] = float("nan"), INF  # rows 3 and 10 are ignored
    logp, grads = check_kernels(h, w, b, y, torch.float32, chunk_rows=24)
    if where == "hidden":
        assert torch.isnan(logp).tolist() == [t == 8 for t in range(40)]
    elif where == "ignored_hidden":
        assert torch.isfinite(logp[y != 10]).all() and all(torch.isfinite(g).all() for g in grads)  # y = 10: dead
    else:
        assert torch.isnan(logp[y != -100]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_in_the_hundreds(dtype):
    """|z| up to ~2000: exp overflows float32 past 88, so only max-subtraction keeps these finite and exact.
    Gradients read the float32 lse, whose rounding (|lse| 2^-24) is a relative error of every probability."""
    h, w, b, y = make(70, 40, 300, scale_h=10.0, scale_w=60.0)
    z_max = (h @ w.T + b).abs().max().item()
    assert z_max > 1000
    logp, grads = check_kernels(h, w, b, y, dtype, rtol=max(2**-23 * z_max, 2e-2 if dtype == torch.bfloat16 else 0))
    assert torch.isfinite(logp).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_registered_ops_pass_opcheck_in_16_bit(dtype):
    """The fake (meta) outputs must match the real ones, empties of unneeded gradients included."""
    h, w, b, y = (t.to(DEVICE) for t in make(9, 6, 17))
    h, w, b = (t.to(dtype) for t in (h, w, b))
    for want_u in (False, True):
        torch.library.opcheck(torch.ops.sami_kernels.linear_logprobs_fwd, (h, w, b, y, -100, 0.5, want_u, 4, "triton"))
    lse = torch.logsumexp((h @ w.T + b).float(), -1)
    g = torch.randn(9, device=DEVICE)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        torch.library.opcheck(
            torch.ops.sami_kernels.linear_logprobs_bwd, (h, w, b, y, lse, g, -100, 1.0, *need, 4, "triton")
        )


def test_fp32_dot_precision_follows_torch():
    """tl.dot's input_precision for float32: "ieee" unless torch allows TF32, through either of its APIs. In a fresh
    process: once both APIs were used, torch.get_float32_matmul_precision() raises for the rest of the process."""
    cases = [
        ("pass", "ieee"),  # torch's default
        ("torch.set_float32_matmul_precision('high')", "tf32"),
        ("torch.set_float32_matmul_precision('medium')", "tf32"),
        ("torch.set_float32_matmul_precision('highest')", "ieee"),
        ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
        ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
        ("torch.backends.cuda.matmul.fp32_precision = 'none'; torch.backends.fp32_precision = 'tf32'", "tf32"),
        ("torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    ]
    lines = [f"{setup}\nprint(tk.fp32_dot_precision())" for setup, _ in cases]
    script = "import torch\nfrom sami_kernels.kernels import triton_logprobs as tk\n" + "\n".join(lines)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [want for _, want in cases]


def test_launchers_pass_the_selected_precision(monkeypatch):
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["DOT_PRECISION"])
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_logprobs, "_lp_fwd_kernel", Spy(triton_logprobs._lp_fwd_kernel))
    monkeypatch.setattr(triton_logprobs, "_lp_dlogits_kernel", Spy(triton_logprobs._lp_dlogits_kernel))
    monkeypatch.setattr(triton_logprobs, "fp32_dot_precision", lambda: "tf32")
    h = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    sk.linear_logprobs(h, w, torch.randint(0, 20, (5,), device=DEVICE), backend="triton").sum().backward()
    assert seen == ["tf32", "tf32"]  # forward, then backward


@pytest.mark.skipif(DEVICE != "cuda", reason="the in-place float32 accumulation of 16-bit products is CUDA-only")
def test_dw_accumulates_in_place_without_a_weight_sized_temporary():
    V, H, R = 4096, 1024, 64
    a = torch.randn(V, R, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(R, H, device="cuda", dtype=torch.bfloat16)
    acc = torch.randn(V, H, device="cuda")
    start = acc.clone()
    triton_logprobs._mm_into(acc, a, b, accumulate=True)  # warm-up: cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    triton_logprobs._mm_into(acc, a, b, accumulate=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < V * H  # a bf16 [V, H] temporary alone is 2 V H bytes
    torch.testing.assert_close(acc, start + 2 * (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-2)


def test_triton_infonce_float64_is_exact():
    M = torch.randn(3, 5, 5, dtype=torch.float64, device=DEVICE) * 3
    for direction in (0, 1, 2):
        loss, dM = triton_infonce.infonce_fwd(M, direction)
        ref_loss, ref_dM = (t.cpu() for t in torch_infonce.infonce_fwd(M, direction))
        assert loss.dtype == dM.dtype == torch.float64
        torch.testing.assert_close(loss.cpu(), ref_loss, rtol=0, atol=1e-13)
        torch.testing.assert_close(dM.cpu(), ref_dM, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="float32 or float64 M, got torch.float16"):
        triton_infonce.infonce_fwd(M.half(), 0)
